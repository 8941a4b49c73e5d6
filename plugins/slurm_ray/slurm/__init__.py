"""The Slurm layer: pure command builders, output parsers and the time grammar.

Nothing here talks to a cluster: the hook and the triggers send the text
built here and hand what comes back to the matching parser.
"""

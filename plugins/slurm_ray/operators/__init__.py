"""slurm_ray operators."""

"""One remote command per poll: job states plus new bytes of watched files.

A trigger watching a job needs its state, the new bytes of its Slurm log and
of its ``metrics.jsonl``.  The triggerer batches every watched job of a host
into one command built here, so 100 jobs cost one SSH exec per interval.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from slurm_ray.utils import remote
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import JobInfo

TAIL_MARKER = "@@slurm_ray:tail"
#: Largest chunk of one file sent per poll; the rest follows next interval.
MAX_CHUNK = 256 * 1024


@dataclass(frozen=True)
class TailRequest:
    """Read ``path`` from byte ``offset`` (at most ``max_bytes``)."""

    path: str
    offset: int
    max_bytes: int = MAX_CHUNK


def build_poll_command(job_ids: Sequence[str], tails: Sequence[TailRequest]) -> str:
    """Shell text printing the states of ``job_ids`` then each tail, base64-framed."""
    parts = []
    if job_ids:
        parts.append(f"{{ {remote.build_states_command(job_ids)} ; }}")
    for idx, req in enumerate(tails):
        if req.offset < 0 or req.max_bytes <= 0:
            raise ValueError(f"bad tail request {req!r}")
        # base64 keeps arbitrary bytes (and partial UTF-8) intact through the text channel.
        parts.append(
            f"printf '\\n%s %d\\n' {quote(TAIL_MARKER)} {idx}; "
            f"{{ tail -c +{req.offset + 1} -- {quote(req.path)} 2>/dev/null | "
            f"head -c {req.max_bytes} | base64 -w0; }}"
        )
    return "; ".join(parts) if parts else "true"


def parse_poll_output(
    text: str, job_ids: Sequence[str], n_tails: int
) -> tuple[dict[str, JobInfo], list[bytes]]:
    """Split poll output into job states and the bytes read for each tail request."""
    head, sep, rest = text.partition(f"\n{TAIL_MARKER} ")
    if not sep and text.startswith(f"{TAIL_MARKER} "):
        head, rest, sep = "", text[len(TAIL_MARKER) + 1 :], "x"
    states = remote.parse_states_output(head, job_ids) if job_ids else {}
    chunks = [b""] * n_tails
    if sep:
        for block in (rest).split(f"\n{TAIL_MARKER} "):
            idx_text, _, payload = block.partition("\n")
            if not idx_text.strip().isdigit():
                continue
            idx = int(idx_text.strip())
            if 0 <= idx < n_tails:
                try:
                    chunks[idx] = base64.b64decode(payload.strip(), validate=True)
                except (binascii.Error, ValueError):
                    chunks[idx] = b""
    return states, chunks

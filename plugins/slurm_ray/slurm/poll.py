"""One remote command per poll: job states plus new bytes of watched files.

A trigger watching a job needs its state, the new bytes of its Slurm log and
of its ``metrics.jsonl``.  The triggerer batches every watched job of a host
into one command built here, so 1,000 jobs cost one SSH exec per interval.

The command text is a constant script; the job ids and the tail requests
travel on its standard input as data.  A command line that grew with the
number of jobs broke at ~790 jobs: Linux refuses any single ``exec`` argument
over 128 KiB (``MAX_ARG_STRLEN``), and sshd passes the command as one.  The
script does a fixed number of passes over its input and over ``squeue``'s
output (``awk``, no process per job); it forks per file only for files that
have new bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from slurm_ray.slurm.fields import SLURM_TIME_ENV
from slurm_ray.slurm.ids import validate_job_id
from slurm_ray.slurm.parsers import SQUEUE_FORMAT, parse_states_output
from slurm_ray.slurm.sacct import build_sacct_command
from slurm_ray.utils.quoting import quote
from slurm_ray.utils.states import JobInfo

TAIL_MARKER = "@@slurm_ray:tail"
#: Largest chunk of one file sent per poll; the rest follows next interval.
MAX_CHUNK = 256 * 1024
#: Bytes of file data one poll may read in all (split evenly between the tails).
POLL_BUDGET = 16 * 1024 * 1024
#: Smallest per-tail share of the budget, however many tails there are.
MIN_CHUNK = 4 * 1024

_TAIL_HEADER_RE = re.compile(rf"{re.escape(TAIL_MARKER)} ([0-9]+) ([0-9]+) (-1|[0-9]+)", re.ASCII)

# Sections as commands.build_states_command prints them, so that
# parsers.parse_states_output reads both.  squeue lists the SSH user's jobs
# (one line per array task) and awk keeps the watched ones: `-j ID,ID,...`
# would again grow one argument with the job count.  Ids squeue did not list
# fall through to scontrol, then sacct, as in build_states_command.
_SCRIPT = (
    r"""
export __TIME_ENV__
m=@@slurm_ray
d=$(cat)
ids=$(printf '%s\n' "$d" | awk '$1 == "J" { print $2 }')
if [ -n "$ids" ]; then
  q=$(squeue -h -a -r -t all -u "$(id -un)" -o __SQUEUE_FORMAT__ 2>&1); rc=$?
  echo "$m:squeue rc=$rc"
  printf '%s\n' "$ids" "$m:ids-end" "$q" | awk -F'|' '
    p == 0 { if ($0 == "@@slurm_ray:ids-end") p = 1; else w[$0] = 1; next }
    ($1 in w) || $0 !~ /^[0-9][0-9_+]*[|]/ { print }'
  miss=$(printf '%s\n' "$q" "$m:q-end" "$ids" | awk -F'|' '
    p == 0 { if ($0 == "@@slurm_ray:q-end") p = 1; else s[$1] = 1; next }
    !($0 in s) { print }')
  case "$rc $q" in "0 "*|*'Invalid job id specified'*) sc=1 ;; *) sc=0 ;; esac
  left=
  for i in $miss; do
    if [ "$sc" = 1 ]; then
      r=$(scontrol show job -o "$i" 2>&1); rc=$?
      echo "$m:scontrol $i rc=$rc"
      printf '%s\n' "$r"
      if [ "$rc" = 0 ]; then continue; fi
    fi
    left="${left:+$left,}$i"
  done
  if [ -n "$left" ]; then
    if command -v sacct >/dev/null 2>&1; then
      a=$(__SACCT__ 2>&1); rc=$?
      echo "$m:sacct rc=$rc"
      printf '%s\n' "$a"
    else
      echo "$m:sacct absent"
    fi
  fi
  echo "$m:end"
fi
t=$(printf '%s\n' "$d" | awk '$1 == "T"')
if [ -n "$t" ]; then
  sz=$(printf '%s\n' "$t" | cut -d' ' -f5- | tr '\n' '\0' |
    xargs -0 stat -L -c '%s %n' -- 2>/dev/null)
  plan=$(printf '%s\n' "$sz" "$m:sizes-end" "$t" | awk '
    p == 0 {
      if ($0 == "@@slurm_ray:sizes-end") { p = 1; next }
      i = index($0, " "); if (i > 1) size[substr($0, i + 1)] = substr($0, 1, i - 1); next
    }
    {
      path = $0; sub(/^T [0-9]+ [0-9]+ [0-9]+ /, "", path)
      if (!(path in size)) { print "@@slurm_ray:tail " $2 " " $3 " -1"; print ""; next }
      s = size[path] + 0; from = $3 + 0
      if (s < from) from = 0
      if (s > from) print "R " $2 " " from " " s " " $4 " " path
      else { print "@@slurm_ray:tail " $2 " " from " " s; print "" }
    }')
  printf '%s\n' "$plan" | grep -v '^R '
  printf '%s\n' "$plan" | grep '^R ' | while read -r k i from s max path; do
    echo "$m:tail $i $from $s"
    tail -c +$((from + 1)) -- "$path" </dev/null 2>/dev/null | head -c "$max" | base64 -w0
    echo
  done
fi
exit 0
""".replace("__TIME_ENV__", SLURM_TIME_ENV)
    .replace("__SQUEUE_FORMAT__", quote(SQUEUE_FORMAT))
    .replace("__SACCT__", build_sacct_command('"$left"'))
)


@dataclass(frozen=True)
class TailRequest:
    """Read ``path`` from byte ``offset`` (at most ``max_bytes``)."""

    path: str
    offset: int
    max_bytes: int = MAX_CHUNK


@dataclass(frozen=True)
class TailChunk:
    """Bytes read for one :class:`TailRequest`.

    :param start: byte offset the data was read from: the requested offset,
        or 0 when the file had shrunk below it (truncated, e.g. a requeue).
    :param size: the file's size when it was looked at; -1 when it did not exist
        (or the poll did not report it).
    :param data: the bytes read.
    """

    start: int = 0
    size: int = -1
    data: bytes = b""


@dataclass(frozen=True)
class PollCommand:
    """A poll: the (constant) command text and the data for its standard input."""

    command: str
    stdin: bytes


def validate_tail(req: TailRequest) -> TailRequest:
    """Return ``req`` if its path and numbers can travel as one data line.

    :raises ValueError: naming the bad field.
    """
    if not isinstance(req.path, str) or not req.path or re.search(r"[\x00\n\r]", req.path):
        raise ValueError(f"tail path {req.path!r}: must be non-empty, without newlines or NUL")
    for label, value, low in (("offset", req.offset, 0), ("max_bytes", req.max_bytes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"tail {label} {value!r}: must be an integer >= {low}")
    return req


def build_poll(
    job_ids: Sequence[str], tails: Sequence[TailRequest], *, budget: int = POLL_BUDGET
) -> PollCommand:
    """The poll for ``job_ids`` and ``tails``: its command text does not depend on them.

    Each tail reads at most ``min(req.max_bytes, budget / len(tails))`` bytes
    (never below :data:`MIN_CHUNK`), so one poll's output stays bounded
    however many files are watched.

    :raises ValueError: for an invalid job id or tail request.
    """
    ids = list(dict.fromkeys(validate_job_id(j) for j in job_ids))
    share = max(MIN_CHUNK, budget // max(1, len(tails)))
    lines = [f"J {j}" for j in ids]
    for idx, req in enumerate(tails):
        validate_tail(req)
        lines.append(f"T {idx} {req.offset} {min(req.max_bytes, share)} {req.path}")
    return PollCommand(_SCRIPT, ("\n".join(lines) + "\n").encode())


def parse_poll_output(
    text: str, job_ids: Sequence[str], n_tails: int
) -> tuple[dict[str, JobInfo], list[TailChunk]]:
    """Split poll output into job states and what was read for each tail request.

    One pass over the lines.  A tail the output does not mention (cut short)
    comes back as an empty :class:`TailChunk` with ``size`` -1.
    """
    lines = text.split("\n")
    states_end = len(lines)
    chunks = [TailChunk()] * n_tails
    for n, line in enumerate(lines):
        header = _TAIL_HEADER_RE.fullmatch(line)
        if header is None:
            continue
        states_end = min(states_end, n)
        idx = int(header[1])
        if not 0 <= idx < n_tails:
            continue
        payload = lines[n + 1].strip() if n + 1 < len(lines) else ""
        if payload.startswith(TAIL_MARKER):
            payload = ""
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        chunks[idx] = TailChunk(start=int(header[2]), size=int(header[3]), data=data)
    states = parse_states_output("\n".join(lines[:states_end]), job_ids) if job_ids else {}
    return states, chunks

"""Pure builders of the shell commands run on a cluster's login node.

Each builder returns one POSIX ``sh`` command line (it runs under the login
shell over SSH; bash, dash, ksh and zsh all read it) with every interpolated
value passed through :func:`slurm_ray.utils.quoting.quote`. Hooks, operators
and triggers only send the text and hand the output to the matching parser in
:mod:`slurm_ray.slurm.parsers`, so all the logic can be tested by running the
text in a real shell.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from slurm_ray.slurm.fields import SLURM_TIME_ENV
from slurm_ray.slurm.ids import validate_job_id, validate_job_ids
from slurm_ray.slurm.parsers import INVALID_JOB_ID, MARKER, SQUEUE_FIELDS, SQUEUE_FORMAT
from slurm_ray.slurm.sacct import build_sacct_command
from slurm_ray.utils.quoting import quote, quote_args
from slurm_ray.utils.states import ACTIVE_STATES

__all__ = [
    "IDENTITY_COMMAND",
    "LOG_TAIL_BYTES",
    "build_cancel_command",
    "build_checkpoint_iteration_command",
    "build_claim_command",
    "build_earlier_metrics_command",
    "build_env_probe_command",
    "build_export_model_command",
    "build_find_jobs_by_name_command",
    "build_log_tail_command",
    "build_makedirs_command",
    "build_node_states_command",
    "build_previous_checkpoint_command",
    "build_resume_copy_command",
    "build_states_command",
]

_SIGNAL_RE = re.compile(r"(?:SIG)?[A-Z][A-Z0-9+]*|[0-9]+", re.ASCII)
#: Prints the remote user, then its home directory, one per line.
IDENTITY_COMMAND = 'id -un && printf "%s\\n" "$HOME"'
#: Bytes of a log's end read for an error message: a line without newline
#: (a progress bar) can be gigabytes, and the message is held in memory.
LOG_TAIL_BYTES = 64 * 1024


def build_states_command(job_ids: Sequence[str]) -> str:
    """
    One shell command that reports the state of every job in ``job_ids``.

    It prints marker-delimited sections, each headed by the exit status of
    the command in it (stderr is folded into the section: error text never
    parses as a record)::

        @@slurm_ray:squeue rc=0         squeue -h -a -t all -j ID,ID,... -o SQUEUE_FORMAT
        @@slurm_ray:scontrol ID rc=1    scontrol show job -o ID, per id squeue did not list
        @@slurm_ray:sacct rc=0          sacct -P (header kept) for ids scontrol did not know,
        @@slurm_ray:sacct absent        ... only when sacct is installed
        @@slurm_ray:end

    Measured on Slurm 22.05: ``squeue -j`` with several ids prints the known
    ones and exits 0 even if some (or all) are unknown; with a single unknown
    id it prints nothing and exits 1 ("Invalid job id specified"); other
    releases may fail the whole list for one unknown id (not seen here, tested
    with a fake squeue). Both cases fall through to the
    per-id ``scontrol``, so one unknown id never hides the others. scontrol
    is skipped when squeue failed for another reason (controller down: each
    call would wait for its timeout). sacct is asked only about ids that
    scontrol did not know (purged after ``MinJobAge``).

    Parse the output with :func:`parse_states_output`.

    :param job_ids: ids as returned by ``sbatch --parsable``; duplicates are ignored.
    :raises ValueError: for an invalid or empty list of ids.
    """
    ids = validate_job_ids(job_ids)
    id_words = quote_args(ids)
    squeue = quote_args(
        ["squeue", "-h", "-a", "-t", "all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT]
    )
    m = MARKER
    parts = [
        # times in UTC ISO form, whatever the user's environment (fields.slurm_time)
        f"export {SLURM_TIME_ENV}",
        f"q=$({squeue} 2>&1); rc=$?",
        f'echo "{m}:squeue rc=$rc"',
        "printf '%s\\n' \"$q\"",
        # scontrol only when the controller answered squeue
        f'case "$rc $q" in "0 "*|*{quote(INVALID_JOB_ID)}*) sc=1 ;; *) sc=0 ;; esac',
        "left=",
        f"for i in {id_words}; do"
        # squeue lines start with "ID|"; grep's BRE reads | + _ literally
        ' if printf \'%s\\n\' "$q" | grep -q "^$i|"; then continue; fi;'
        ' if [ "$sc" = 1 ]; then'
        ' r=$(scontrol show job -o "$i" 2>&1); rc=$?;'
        f' echo "{m}:scontrol $i rc=$rc";'
        " printf '%s\\n' \"$r\";"
        ' if [ "$rc" = 0 ]; then continue; fi;'
        " fi;"
        ' left="${left:+$left,}$i";'
        " done",
        _sacct_section(),
        f"echo {quote(m + ':end')}",
    ]
    return "; ".join(parts)


def _sacct_section() -> str:
    """Shell text: the sacct section for the ids in ``$left`` (scontrol did not know them)."""
    sacct = build_sacct_command('"$left"')  # $left: validated ids
    return (
        'if [ -n "$left" ]; then'
        " if command -v sacct >/dev/null 2>&1; then"
        f" a=$({sacct} 2>&1); rc=$?;"
        f' echo "{MARKER}:sacct rc=$rc";'
        " printf '%s\\n' \"$a\";"
        f" else echo {quote(MARKER + ':sacct absent')};"
        " fi;"
        " fi"
    )


def build_find_jobs_by_name_command(name: str) -> str:
    """
    List the current user's jobs (all states squeue still knows) named ``name``.

    ``squeue -n`` takes a comma-separated list, so a name with a comma is not
    passed to it; :func:`parse_find_jobs_by_name` always filters by exact name.
    The caller must check the exit status: a failed squeue is not "no job".

    :raises ValueError: for an empty name or one with control characters.
    """
    if not isinstance(name, str) or not name or re.search(r"[\x00-\x1f\x7f]", name):
        raise ValueError(f"invalid job name {name!r}")
    args = ["squeue", "-h", "-a", "-t", "all", "-o", SQUEUE_FORMAT]
    if "," not in name:
        args += ["-n", name]
    # "$(id -un)" is expanded remotely: the SSH user, whose jobs we submitted.
    return quote_args(args) + ' -u "$(id -un)"'


def build_cancel_command(
    job_id: str,
    signal: str | None = None,
    *,
    batch: bool = False,
    full: bool = False,
) -> str:
    """
    ``scancel`` one job, or send it a signal.

    :param job_id: the job to cancel.
    :param signal: send this signal (``TERM``, ``SIGUSR1``, ``10``) instead of cancelling.
    :param batch: ``--batch``: signal only the batch shell, not the other steps.
    :param full: ``--full``: signal the batch shell and every step.
    :raises ValueError: for an invalid id or signal, or ``batch`` with ``full``.
    """
    args = ["scancel"]
    if signal is not None:
        if not isinstance(signal, str) or not _SIGNAL_RE.fullmatch(signal):
            raise ValueError(f"invalid signal {signal!r}: expected a name like USR1 or a number")
        args.append(f"--signal={signal}")
    if batch and full:
        raise ValueError("scancel --batch and --full are mutually exclusive")
    if batch:
        args.append("--batch")
    if full:
        args.append("--full")
    args.append(validate_job_id(job_id))
    return quote_args(args)


def _task_jobs_function() -> str:
    """Shell function ``task_jobs own|newer|older``: the ids of the user's active jobs
    named ``$key`` + a try number equal to, above or below ``$try``, on one line.

    It exits 3 (in its subshell) when squeue fails: a failed query is never "no job".
    """
    active = "|".join(sorted(state.value for state in ACTIVE_STATES))
    # id|state|...|name (SQUEUE_FORMAT): the name is everything after the last field's "|".
    classify = (
        f'{{ i = $1; n = $0; for (k = 0; k < {len(SQUEUE_FIELDS) - 1}; k++) sub(/^[^|]*[|]/, "", n);'
        # A hetjob is listed once per component (ID+0, ID+1): it counts once, as ID.
        ' if (i ~ /^[0-9]+[+]0$/) sub(/[+]0$/, "", i); else if (i ~ /[+]/) next;'
        f" if (i !~ /^[0-9]+(_[0-9]+)?$/ || $2 !~ /^({active})$/ || index(n, key) != 1) next;"
        " t = substr(n, length(key) + 1); if (t !~ /^[0-9]+$/) next;"
        ' c = (t + 0 == try) ? "own" : ((t + 0 > try) ? "newer" : "older");'
        ' if (c == want) { printf "%s%s", (m++ ? " " : ""), i } }'
        ' END { if (m) print "" }'
    )
    squeue = quote_args(["squeue", "-h", "-a", "-t", "all", "-o", SQUEUE_FORMAT])
    return (
        "task_jobs() { q=$(" + squeue + ' -u "$(id -un)" 2>&1)'
        ' || { printf "slurm_ray: squeue failed: %s\\n" "$q" >&2; exit 3; };'
        ' printf "%s\\n" "$q" | awk -F"|" -v key="$key" -v try="$try" -v want="$1" '
        + quote(classify)
        + "; }"
    )


def _cancel_older(wait_s: int) -> str:
    """Shell text: scancel ``$older`` and wait up to ``wait_s`` until they left the queue."""
    return (
        'if [ -n "$older" ]; then'
        ' scancel $older || { echo "slurm_ray: scancel $older failed" >&2; exit 3; };'
        " n=0; left=$older;"
        ' while [ -n "$left" ]; do'
        f' if [ "$n" -ge {int(wait_s)} ]; then'
        f' echo "slurm_ray: jobs $left of earlier tries still queued after {int(wait_s)}s" >&2; exit 4; fi;'
        " sleep 1; n=$((n + 1)); left=$(task_jobs older) || exit 3;"
        " done;"
        ' echo "cancelled:$older";'
        " fi"
    )


def build_claim_command(
    task_dir: str,
    try_dir: str,
    task_key: str,
    try_number: int,
    *,
    submit: bool,
    wait_s: int = 120,
) -> str:
    """
    Make the try ``try_number`` the only one of its task with a job in Slurm.

    Every try's job is named ``task_key + str(try_number)``; the task key does
    not depend on the try. Under the task's lock (``task_dir/.submit.lock``,
    shared by all tries, so a late ``sbatch`` of an earlier try and this one
    are serialised) it lists the user's active jobs of the task and prints::

        superseded:ID     a later try has a job: this one must not submit
        cancelled:ID ...  earlier tries' jobs were cancelled and have left the
                          queue (waited up to ``wait_s``), then one of:
        attach:ID         this try's job is queued or running: adopt it
        submitted:ID      (``submit``) ``sbatch --parsable job.sbatch`` in ``try_dir``
        clear             (not ``submit``) no other job of the task is active

    A failing squeue or scancel, a lock not taken in 120 s, or earlier jobs
    still queued after ``wait_s`` exit non-zero with the reason on stderr:
    a failed query is never read as "no job".

    :raises ValueError: for a bad key, try number or wait.
    """
    if not isinstance(task_key, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", task_key):
        raise ValueError(f"invalid task key {task_key!r}")
    for label, value in (("try_number", try_number), ("wait_s", wait_s)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    lock = quote(posixpath.join(task_dir, ".submit.lock"))
    parts = [
        # umask 077: the lock and every file the job creates (Slurm's log,
        # metrics, checkpoints) are owner-only on a shared site.
        "umask 077",
        f"mkdir -p -- {quote(task_dir)} && exec 9>>{lock} && flock -w 120 9"
        f" || {{ echo {quote('slurm_ray: could not take the task lock ' + task_dir)} >&2; exit 3; }}",
        f"key={quote(task_key)}; try={int(try_number)}",
        _task_jobs_function(),
        "newer=$(task_jobs newer) || exit 3",
        'if [ -n "$newer" ]; then echo "superseded:${newer%% *}"; exit 0; fi',
        "older=$(task_jobs older) || exit 3",
        _cancel_older(wait_s),
        "own=$(task_jobs own) || exit 3",
        'if [ -n "$own" ]; then echo "attach:${own%% *}"; exit 0; fi',
    ]
    if submit:
        parts.append(
            f'cd {quote(try_dir)} && j=$(sbatch --parsable job.sbatch) && echo "submitted:$j"'
        )
    else:
        parts.append("echo clear")
    return "; ".join(parts)


def build_log_tail_command(path: str, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last ``max_bytes`` bytes of ``path`` (errors folded into the output).

    Bytes, not lines: ``tail -n`` of a file without newlines is the whole file.
    Take the last lines of the result with :func:`~slurm_ray.slurm.parsers.last_lines`.
    """
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return f"tail -c {max_bytes} -- {quote(path)} 2>&1"


def build_makedirs_command(path: str) -> str:
    """``mkdir -p`` an owner-only directory and prove it is writable."""
    probe = quote(posixpath.join(path, ".slurm_ray_write_probe"))
    p = quote(path)
    # umask 077: every directory this creates is owner-only (a shared site);
    # the leaf is made 0700 even if it existed.
    return f"umask 077 && mkdir -p -- {p} && chmod 700 -- {p} && : > {probe} && rm -f -- {probe}"


def build_checkpoint_iteration_command(run_dir: str) -> str:
    """Prints the iteration of the newest ``run_dir/checkpoints/iter_N`` (nothing if none)."""
    ckpts = quote(posixpath.join(run_dir, "checkpoints"))
    return f"ls -1d {ckpts}/iter_* 2>/dev/null | sed 's/.*iter_//' | sort -n | tail -1"


def build_previous_checkpoint_command(task_dir: str) -> str:
    """Prints ``try_N/checkpoints/iter_M`` of the newest checkpoint of any try of a task."""
    return (
        f"cd {quote(task_dir)} 2>/dev/null && "
        "ls -1d try_*/checkpoints/iter_* 2>/dev/null | "
        "awk -F/ '{n=$3; sub(/iter_/,\"\",n); print n+0, $0}' | sort -n | tail -1 | cut -d' ' -f2"
    )


def build_resume_copy_command(checkpoint: str, run_dir: str) -> str:
    """Copy an earlier try's checkpoint into ``run_dir/checkpoints`` (the driver resumes it)."""
    d = quote(posixpath.join(run_dir, "checkpoints"))
    return f"mkdir -p {d} && cp -a {quote(checkpoint)} {d}/"


def build_env_probe_command(kind: str, prefix: str) -> str | None:
    """Exits 0 when the environment exists or is being built; None for kinds without one."""
    if kind == "venv":
        probe = f"test -f {quote(posixpath.join(prefix, 'bin', 'activate'))}"
    elif kind == "conda":
        probe = f"test -d {quote(posixpath.join(prefix, 'conda-meta'))}"
    else:
        return None
    # A build in progress holds PREFIX.lock; the job waits for it (activation_lines).
    return f"{probe} || test -e {quote(prefix + '.lock')}"


def build_node_states_command(nodelist: str) -> str:
    """``node|state`` per node of ``nodelist`` (sinfo)."""
    return f"sinfo -h -N -n {quote(nodelist)} -o '%N|%T'"


def build_earlier_metrics_command(task_dir: str, this_try: str) -> str:
    """The ``metrics.jsonl`` rows of every try of a task but ``this_try``, oldest try first."""
    return (
        f"cd {quote(task_dir)} 2>/dev/null || exit 0; "
        "for d in $(ls -1d try_* 2>/dev/null | sort -t_ -k2 -n); do "
        f'[ "$d" != {quote(this_try)} ] && [ -f "$d/metrics.jsonl" ] && cat -- "$d/metrics.jsonl"; '
        "done; exit 0"
    )


def build_export_model_command(run_dir: str, activation_lines: Sequence[str]) -> str:
    """Build ``run_dir/mlflow_model`` with the cluster-side environment (once)."""
    d = quote(run_dir)
    lines = [f"cd {d}", *activation_lines]
    activate = " && ".join(f"{{ {line.rstrip(';')}; }}" for line in lines)
    return (
        f"if [ -f {d}/mlflow_model/MLmodel ]; then echo already exported; "
        f"else {activate} && python -u export_model.py --run-dir {d}; fi"
    )

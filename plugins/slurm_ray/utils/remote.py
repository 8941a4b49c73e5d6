"""Pure builders of the shell commands run on a cluster's login node, and their parsers.

Each builder returns one POSIX ``sh`` command line (it runs under the login
shell over SSH; bash, dash, ksh and zsh all read it) with every interpolated
value passed through :func:`slurm_ray.utils.quoting.quote`. Hooks and triggers
only send the text and hand the output to the matching parser, so all the
logic can be tested by running the text in a real shell.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from slurm_ray.utils.quoting import quote, quote_args
from slurm_ray.utils.states import (
    ACTIVE_STATES,
    SACCT_FORMAT,
    SQUEUE_FORMAT,
    JobInfo,
    SlurmState,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
)

__all__ = [
    "MARKER",
    "build_cancel_command",
    "build_claim_command",
    "build_find_jobs_by_name_command",
    "build_read_from_offset_command",
    "build_states_command",
    "parse_claim_output",
    "parse_find_jobs_by_name",
    "parse_states_output",
    "validate_job_id",
]

#: Prefix of the section marker lines printed by :func:`build_states_command`.
MARKER = "@@slurm_ray"

# What sbatch --parsable prints (no cluster suffix), an array task (123_4) or a
# het component (123+1). Anything else could be an option or shell text.
_JOB_ID_RE = re.compile(r"[1-9][0-9]*(?:_[0-9]+|\+[0-9]+)?", re.ASCII)
_SIGNAL_RE = re.compile(r"(?:SIG)?[A-Z][A-Z0-9+]*|[0-9]+", re.ASCII)
_SECTION_RE = re.compile(
    rf"{re.escape(MARKER)}:(?P<kind>squeue|scontrol|sacct|end)"
    r"(?: (?P<job_id>[0-9][0-9_+]*))?(?: rc=(?P<rc>[0-9]+)| (?P<absent>absent))?",
    re.ASCII,
)
# slurm_strerror(ESLURM_INVALID_JOB_ID): the controller answered and does not know the id.
_INVALID_JOB_ID = "Invalid job id specified"
# sacct on a cluster without slurmdbd: a permanent "no accounting", not a failure.
_NO_ACCOUNTING = "accounting storage is disabled"


def validate_job_id(job_id: str) -> str:
    """
    Return ``job_id`` if it is a Slurm job id (``123``, ``123_4``, ``123+1``).

    :raises ValueError: for anything else, including ids with whitespace or options.
    """
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise ValueError(f"invalid Slurm job id {job_id!r}: expected digits, 123_4 or 123+1")
    return job_id


def _validate_job_ids(job_ids: Sequence[str]) -> list[str]:
    if isinstance(job_ids, str):
        # a bare "123" would otherwise be read as the ids "1", "2", "3"
        raise TypeError("job_ids must be a sequence of ids, not a string")
    ids = list(dict.fromkeys(validate_job_id(j) for j in job_ids))
    if not ids:
        raise ValueError("job_ids must not be empty")
    return ids


def build_states_command(job_ids: Sequence[str]) -> str:
    """
    One shell command that reports the state of every job in ``job_ids``.

    It prints marker-delimited sections, each headed by the exit status of
    the command in it (stderr is folded into the section: error text never
    parses as a record)::

        @@slurm_ray:squeue rc=0         squeue -h -a -t all -j ID,ID,... -o SQUEUE_FORMAT
        @@slurm_ray:scontrol ID rc=1    scontrol show job -o ID, per id squeue did not list
        @@slurm_ray:sacct rc=0          sacct ... -j IDS, for ids scontrol did not know,
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
    ids = _validate_job_ids(job_ids)
    id_words = quote_args(ids)
    squeue = quote_args(
        ["squeue", "-h", "-a", "-t", "all", "-j", ",".join(ids), "-o", SQUEUE_FORMAT]
    )
    sacct = f'sacct -n -P -X -j "$left" --format={quote(SACCT_FORMAT)}'  # $left: validated ids
    m = MARKER
    parts = [
        f"q=$({squeue} 2>&1); rc=$?",
        f'echo "{m}:squeue rc=$rc"',
        "printf '%s\\n' \"$q\"",
        # scontrol only when the controller answered squeue
        f'case "$rc $q" in "0 "*|*{quote(_INVALID_JOB_ID)}*) sc=1 ;; *) sc=0 ;; esac',
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
        'if [ -n "$left" ]; then'
        " if command -v sacct >/dev/null 2>&1; then"
        f" a=$({sacct} 2>&1); rc=$?;"
        f' echo "{m}:sacct rc=$rc";'
        " printf '%s\\n' \"$a\";"
        f" else echo {quote(m + ':sacct absent')};"
        " fi;"
        " fi",
        f"echo {quote(m + ':end')}",
    ]
    return "; ".join(parts)


def _brief(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_states_output(text: str, job_ids: Sequence[str]) -> dict[str, JobInfo]:
    """
    Parse the output of :func:`build_states_command` for the same ``job_ids``.

    Every requested id gets an entry: the first source that lists it wins
    (squeue, then scontrol, then sacct). An id no source lists is NOT_FOUND
    only when that is proven: scontrol answered "Invalid job id specified"
    and sacct either is absent, has no accounting storage, or succeeded
    without listing it. Otherwise (squeue or sacct failed, output cut short)
    it is UNKNOWN with the evidence in ``reason``: a failed query is never
    read as a finished job.

    :raises ValueError: for invalid ids, as :func:`build_states_command`.
    """
    ids = _validate_job_ids(job_ids)
    sections: list[tuple[re.Match[str], list[str]]] = []
    for line in text.splitlines():
        header = _SECTION_RE.fullmatch(line)
        if header:
            sections.append((header, []))
        elif sections:
            sections[-1][1].append(line)

    squeue: dict[str, JobInfo] = {}
    scontrol: dict[str, JobInfo] = {}
    sacct: dict[str, JobInfo] = {}
    squeue_error = ""
    scontrol_status: dict[str, tuple[int, str]] = {}
    sacct_status: tuple[str, str] | None = None  # ("ok" | "none" | "error", message)
    complete = False
    for header, body in sections:
        kind, rc, joined = header["kind"], int(header["rc"] or 0), "\n".join(body)
        if kind == "squeue":
            # records are trusted even when rc != 0 (other ids may be unknown)
            squeue.update(parse_squeue(joined))
            if rc != 0 and _INVALID_JOB_ID not in joined:
                squeue_error = f"squeue failed (rc={rc}): {_brief(joined)}"
        elif kind == "scontrol":
            scontrol.update(parse_scontrol(joined))
            if header["job_id"]:
                scontrol_status[header["job_id"]] = (rc, joined)
        elif kind == "sacct":
            if header["absent"]:
                sacct_status = ("none", "sacct is not installed")
            elif rc == 0:
                sacct.update(parse_sacct(joined))
                sacct_status = ("ok", "")
            elif _NO_ACCOUNTING in joined:
                sacct_status = ("none", "accounting storage is disabled")
            else:
                sacct_status = ("error", f"sacct failed (rc={rc}): {_brief(joined)}")
        elif kind == "end":
            complete = True

    result: dict[str, JobInfo] = {}
    for job_id in ids:
        found = squeue.get(job_id) or scontrol.get(job_id) or sacct.get(job_id)
        if found is not None:
            result[job_id] = found
            continue
        state, reason = _missing_state(
            job_id, complete, squeue_error, scontrol_status, sacct_status
        )
        result[job_id] = JobInfo(job_id=job_id, state=state, reason=reason, source="none")
    return result


def _missing_state(
    job_id: str,
    complete: bool,
    squeue_error: str,
    scontrol_status: dict[str, tuple[int, str]],
    sacct_status: tuple[str, str] | None,
) -> tuple[SlurmState, str]:
    """NOT_FOUND with proof, else UNKNOWN with the evidence."""
    if not complete:
        return SlurmState.UNKNOWN, "state query output was cut short (no end marker)"
    if squeue_error:
        return SlurmState.UNKNOWN, squeue_error
    rc, message = scontrol_status.get(job_id, (-1, "scontrol was not run"))
    if _INVALID_JOB_ID not in message:
        return SlurmState.UNKNOWN, f"scontrol rc={rc}: {_brief(message)}"
    if sacct_status is None:
        return SlurmState.UNKNOWN, "sacct section missing"
    status, why = sacct_status
    if status == "error":
        return SlurmState.UNKNOWN, why
    if status == "none":
        return SlurmState.NOT_FOUND, f"unknown to squeue and scontrol; {why}"
    return SlurmState.NOT_FOUND, "unknown to squeue, scontrol and sacct"


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


def parse_find_jobs_by_name(text: str, name: str) -> list[JobInfo]:
    """The jobs named exactly ``name`` in the output of the find command, oldest first."""
    jobs = [info for info in parse_squeue(text).values() if info.name == name]
    return sorted(jobs, key=lambda info: [int(p) for p in re.findall(r"[0-9]+", info.job_id)])


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


def build_read_from_offset_command(path: str, offset: int, max_bytes: int) -> str:
    """
    Print at most ``max_bytes`` bytes of ``path`` starting at byte ``offset``.

    Prints nothing and exits 0 when the file does not exist yet (a job's log
    before it starts); a path that is not a readable regular file exits 1
    with a message on stderr, instead of looking like "no new output". The
    output is raw bytes: advance the offset by the number of bytes received
    and decode incrementally, since a UTF-8 character may be split.

    :raises ValueError: for a negative offset, non-positive ``max_bytes`` or an empty path.
    """
    for label, value, low in (("offset", offset, 0), ("max_bytes", max_bytes, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
    if not isinstance(path, str) or not path:
        raise ValueError(f"invalid path {path!r}")
    p = quote(path)
    # The readability test is done up front because a pipeline's status is the
    # status of head, which would hide tail failing (no pipefail in POSIX sh).
    # tail -c +N is 1-based; "--" keeps a path starting with "-" from being an option.
    return (
        f"if [ ! -e {p} ]; then :; "
        f"elif [ -f {p} ] && [ -r {p} ]; then tail -c +{offset + 1} -- {p} | head -c {max_bytes}; "
        f"else echo {quote('cannot read ' + path)} >&2; false; fi"
    )


#: What :func:`build_claim_command` found or did, parsed by :func:`parse_claim_output`.
ClaimOutcome = tuple[str, str, list[str]]  # (action, job id, cancelled ids)


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
    active = "|".join(sorted(state.value for state in ACTIVE_STATES))
    # id|state|...|name (SQUEUE_FORMAT): the name is everything after the 6th "|".
    classify = (
        '{ i = $1; n = $0; for (k = 0; k < 6; k++) sub(/^[^|]*[|]/, "", n);'
        f" if (i !~ /^[0-9]+(_[0-9]+)?$/ || $2 !~ /^({active})$/ || index(n, key) != 1) next;"
        " t = substr(n, length(key) + 1); if (t !~ /^[0-9]+$/) next;"
        ' c = (t + 0 == try) ? "own" : ((t + 0 > try) ? "newer" : "older");'
        ' if (c == want) { printf "%s%s", (m++ ? " " : ""), i } }'
        ' END { if (m) print "" }'
    )
    squeue = quote_args(["squeue", "-h", "-a", "-t", "all", "-o", SQUEUE_FORMAT])
    lock = quote(posixpath.join(task_dir, ".submit.lock"))
    parts = [
        # umask 077: the lock and every file the job creates (Slurm's log,
        # metrics, checkpoints) are owner-only on a shared site.
        "umask 077",
        f"mkdir -p -- {quote(task_dir)} && exec 9>>{lock} && flock -w 120 9"
        f" || {{ echo {quote('slurm_ray: could not take the task lock ' + task_dir)} >&2; exit 3; }}",
        f"key={quote(task_key)}; try={int(try_number)}",
        # $1: own | newer | older; exits 3 (in its subshell) when squeue fails
        "task_jobs() { q=$(" + squeue + ' -u "$(id -un)" 2>&1)'
        ' || { printf "slurm_ray: squeue failed: %s\\n" "$q" >&2; exit 3; };'
        ' printf "%s\\n" "$q" | awk -F"|" -v key="$key" -v try="$try" -v want="$1" '
        + quote(classify)
        + "; }",
        "newer=$(task_jobs newer) || exit 3",
        'if [ -n "$newer" ]; then echo "superseded:${newer%% *}"; exit 0; fi',
        "older=$(task_jobs older) || exit 3",
        'if [ -n "$older" ]; then'
        ' scancel $older || { echo "slurm_ray: scancel $older failed" >&2; exit 3; };'
        " n=0; left=$older;"
        ' while [ -n "$left" ]; do'
        f' if [ "$n" -ge {int(wait_s)} ]; then'
        f' echo "slurm_ray: jobs $left of earlier tries still queued after {int(wait_s)}s" >&2; exit 4; fi;'
        " sleep 1; n=$((n + 1)); left=$(task_jobs older) || exit 3;"
        " done;"
        ' echo "cancelled:$older";'
        " fi",
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


def parse_claim_output(text: str) -> ClaimOutcome:
    """``(action, job_id, cancelled_ids)`` from :func:`build_claim_command`'s output.

    ``action`` is ``attach``, ``superseded``, ``submitted`` or ``clear``.

    :raises ValueError: when the output ends without one of them.
    """
    cancelled: list[str] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(":")
        if word == "cancelled":
            cancelled = rest.split()
        elif word in ("attach", "superseded", "submitted"):
            job_id = rest.strip().split(";", 1)[0]
            return word, validate_job_id(job_id), cancelled
        elif line.strip() == "clear":
            return "clear", "", cancelled
    raise ValueError(f"the submit command did not say what it did: {text[-500:]!r}")

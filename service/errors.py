"""The error vocabulary shared by the CLI and the worker.

Domain code raises these; only the process edges (the CLI, the worker) turn them into exit
codes, so library code never calls ``sys.exit``. The exit codes are part of the Kubernetes
contract: the Job's podFailurePolicy fails the whole Job on exit code 2 (retrying a bad spec or
a corrupt dataset only burns GPU hours) and retries every other non-zero code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER = 2  # bad spec, bad data, bad credentials: not retriable
EXIT_RETRY = 75  # EX_TEMPFAIL: storage down, preempted, interrupted: retry me
EXIT_CRASH = 1  # a bug: the traceback is printed; Kubernetes retries up to backoffLimit
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, without a checkpoint
# The longest message a person (stderr, status.json) gets: messages quote input (a member name,
# a header, a file name), and hostile input must not make them grow with it (a 400 MiB tar
# long name once became a 419 MB error line and status.json).
MAX_MESSAGE_CHARS = 500


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 40)
    return f"{text[:keep]}… ({len(text) - keep} more characters)"


class BackbonesError(Exception):
    """Base class: a message meant for a person, one line, no traceback; never longer than
    ``MAX_MESSAGE_CHARS``."""

    exit_code = 1

    def __init__(self, *args: object):
        if len(args) == 1 and isinstance(args[0], str):
            args = (clip(args[0]),)
        super().__init__(*args)


class UserError(BackbonesError):
    """The input is wrong (spec, data, credentials). Retrying will not help."""

    exit_code = EXIT_USER


class RetriableError(BackbonesError):
    """A transient fault (storage unreachable, preemption). The same run may succeed later."""

    exit_code = EXIT_RETRY


class Interrupted(RetriableError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can resume."""


class DiskFull(RetriableError):
    """The node's disk (usually the dataset cache) is full: another node, or a larger
    emptyDir, may succeed, so it is retriable and not the user's fault."""


def disk_full(e: OSError, where: str | None = None) -> DiskFull | None:
    """A one-line DiskFull for ENOSPC/EDQUOT, else None. ``where`` names the folder when the
    OS error carries no file name (a write on an open file)."""
    import errno

    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    path = e.filename or where or "disk"
    return DiskFull(
        f"{path}: {e.strerror or 'No space left on device'} (free space in the dataset cache, "
        "or raise resources.cache_size)"
    )


def _transient_errnos() -> frozenset[int]:
    import errno

    names = (
        "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "EHOSTUNREACH",
        "ENETUNREACH", "ENETDOWN", "ENETRESET", "EAGAIN", "EIO", "ESTALE",
    )  # fmt: skip
    return frozenset(getattr(errno, n) for n in names if hasattr(errno, n))


def exit_for(e: BaseException, where: str | None = None) -> tuple[int, str] | None:
    """The exit code and the one line (without ``error:``) for a failure, or None for a bug.

    The one mapping every entry point uses (``backbones run``/``worker``, ``python -m
    service.run.worker``, each torchrun rank), so a failure has one code wherever it happens
    (docs/reliability.md, "One failure, one exit code"). A domain error carries its code. An
    OS error that is not a domain error: a full disk (``where`` names the folder when the
    error names no file) or a network or I/O fault the next attempt may not meet is 75; any
    other (permission denied, not a directory, read-only file system, a name too long) is the
    input's fault: 2, naming the file. A second Ctrl-C is 130. None: a bug, whose traceback the
    caller lets through (exit 1).
    """
    if isinstance(e, BackbonesError):
        return e.exit_code, str(e)
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, OSError):
        full = disk_full(e, where)
        if full is not None:
            return full.exit_code, str(full)
        name = f"{e.filename}: " if getattr(e, "filename", None) else ""
        transient = isinstance(e, TimeoutError | ConnectionError) or e.errno in _transient_errnos()
        code = EXIT_RETRY if transient else EXIT_USER
        return code, f"{name}{e.strerror or e}"
    return None

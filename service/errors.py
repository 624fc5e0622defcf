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


class BackbonesError(Exception):
    """Base class: a message meant for a person, one line, no traceback."""

    exit_code = 1


class UserError(BackbonesError):
    """The input is wrong (spec, data, credentials). Retrying will not help."""

    exit_code = EXIT_USER


class RetriableError(BackbonesError):
    """A transient fault (storage unreachable, preemption). The same run may succeed later."""

    exit_code = EXIT_RETRY


class Interrupted(RetriableError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can resume."""

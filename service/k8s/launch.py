"""``torchrun`` that keeps the worker's exit code: the pod command when resources.gpus > 1.

torchrun exits 1 whenever a rank fails, whatever the rank's own code. That would hide exit
code 2 (bad spec or data) from the Job's podFailurePolicy, and Kubernetes would retry a run that
cannot succeed. This wrapper runs torchrun unchanged and maps a failed launch back onto the
worker contract: 2 if any rank said "user error"; 75 (retriable, ignored by the Job's failure
policy) when every failed rank stopped retriably (75) or was stopped by SIGTERM/SIGINT (the
pod's own preemption or cancel, passed on by torchrun); else 1, a crash, which counts against
the backoff limit as a single worker's crash does. A rank killed by any other signal crashed:
SIGABRT (the NCCL watchdog tearing down a hung collective), SIGSEGV, SIGKILL (the kernel's OOM
killer) would fail again the same way, so they must not be retried without end.

    python -m service.k8s.launch --standalone --nproc-per-node=4 -m service.run.worker
"""

from __future__ import annotations

import signal
import sys

from service.errors import EXIT_OK, EXIT_RETRY, EXIT_USER

EXIT_CRASH = 1
# Negative codes: the rank died of that signal. Only a stop we asked for is retriable.
STOP_SIGNALS = (-signal.SIGTERM, -signal.SIGINT)


def exit_code(rank_codes: list[int]) -> int:
    """One pod exit code from the failed ranks' codes (negative: killed by a signal)."""
    if EXIT_USER in rank_codes:
        return EXIT_USER
    if all(c == EXIT_RETRY or c in STOP_SIGNALS for c in rank_codes):
        return EXIT_RETRY
    return EXIT_CRASH


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as e:
        # SIGTERM (preemption, cancel): torchrun has passed it on to the ranks, which
        # checkpoint and stop. The run resumes later.
        print(f"launch: stopped by signal {e.sigval.name}", file=sys.stderr)
        return EXIT_RETRY
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        print(f"launch: ranks failed with exit codes {codes}", file=sys.stderr)
        return exit_code(codes)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Put this folder first on a fresh subprocess' PYTHONPATH to watch its imports from threads.

- ``BACKBONES_IMPORT_TRACE=FILE``: every module whose *first* import runs on a thread other than
  the main one is appended to FILE as ``<thread name>\t<module>``. An audit hook sees the
  "import" event only when a module is actually loaded, so a lookup of an imported module
  costs nothing and is not recorded. The rule under test: nothing is first imported in a thread.
- ``BACKBONES_TEST_CPUS=N``: the process sees N CPUs in its affinity mask, as on an N-core node,
  so that the pools that size themselves by it start N threads on this 2-core machine.
"""

import os
import sys
import threading

_trace = os.environ.get("BACKBONES_IMPORT_TRACE")
if _trace:
    _main = threading.main_thread()

    def _hook(event: str, args: tuple) -> None:
        if event == "import" and threading.current_thread() is not _main:
            with open(_trace, "a") as f:
                f.write(f"{threading.current_thread().name}\t{args[0]}\n")

    sys.addaudithook(_hook)

if os.environ.get("BACKBONES_TEST_CPUS"):
    _cpus = set(range(int(os.environ["BACKBONES_TEST_CPUS"])))
    os.sched_getaffinity = lambda pid: set(_cpus)

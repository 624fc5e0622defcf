"""One run in its pod: the worker (the process's composition root), its output files and their
contract, the lease that keeps two pods off one output, the event log, the console, and the
Prometheus exporter."""

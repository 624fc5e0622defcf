"""One run in its pod: the worker (the process's composition root), one run's lifecycle
(``cell``: skip, lease, resume, fail) and its training pipeline (``pipeline``: spec -> data ->
model -> trainer), its output files (``outputs``) and their typed contract (``contract``:
summary.json, status.json), the lease that keeps two pods off one output, the event log, the
console, and the Prometheus exporter."""

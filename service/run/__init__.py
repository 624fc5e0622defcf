"""One run in its pod: the worker (the process's composition root), one run's lifecycle
(``cell``: skip, lease, resume, fail) and its training pipeline (``pipeline``: spec -> data ->
model -> trainer), the lease that keeps two pods off one output, the listeners (status.json in
``status_file``, the console, the Prometheus exporter). What a run writes, and the contract of
those files, is ``service.outputs``."""

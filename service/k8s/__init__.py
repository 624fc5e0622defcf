"""Kubernetes: ``render`` and ``pod`` (pure: spec -> Job dict), ``search_jobs`` (a search's
driver Job and its rung Jobs), ``status`` (pure: Job, pods and
status.json -> the status table), ``ops`` (submit, status, logs, cancel over a ``Cluster``) and
``client`` (the only module that imports the ``kubernetes`` package; every API failure names
the verb and ``namespace/name``)."""

"""Kubernetes: ``render`` (pure: spec -> Job dict) and ``client`` (the only module that imports
the ``kubernetes`` package; every API failure names the verb and ``namespace/name``)."""

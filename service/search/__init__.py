"""Successive halving over backbones: a Study's ``search`` (pure planning, the driver, the
zero-training proxy rung). ``plan`` imports no torch; ``driver`` and ``proxy`` do, lazily. On a
cluster its rungs are Jobs: ``service.k8s.search_jobs``."""

"""What a run leaves behind and tells the world, below every stage that writes or reads it:
the run folder's layout (``folder``: ``RunOutputs``), what ``summary.json`` and ``status.json``
hold and their ``schema_version`` (``contract``: ``RunSummary``, ``RunStatus``, ``Progress``),
and the listener hooks a trainer calls (``events``). Train writes it, run wires it, search, k8s
and the report read it; none of them is imported here."""

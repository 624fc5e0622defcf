"""What a spec costs before it runs: the GPU-hours estimate and the budget check (``budget``),
how many images a dataset holds (``dataset_sizes``), the Job's default deadline (``deadline``).
Above spec, data, storage, backbones and the recipe registry, whose facts it combines; imports
no torch, so ``backbones validate`` and ``budget`` stay fast."""

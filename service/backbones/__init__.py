"""Backbones: the curated catalog, one factory that builds any of them by name (timm,
torchvision or WaveMix) with its pretrained weights (``weights``: the hub or a safetensors file,
checked key by key), the name and resolution checks run before a job starts (``names``,
``checks``), and ``backbones weights push`` for clusters without internet."""

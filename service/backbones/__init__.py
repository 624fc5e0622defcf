"""Backbones: the curated catalog, one factory that builds any of them by name (timm,
torchvision or WaveMix) with its pretrained weights, the name and resolution checks run before
a job starts, and ``backbones weights push`` for clusters without internet."""

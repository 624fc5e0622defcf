"""The ``backbones`` command line: a thin typer layer over the service modules.

Each ``*_cmds`` module registers its commands on ``app``; heavy libraries (torch, timm, boto3,
kubernetes) are imported inside the commands that need them, so ``backbones validate`` stays
fast and torch-free.
"""

from __future__ import annotations

from service.cli._app import app, main

# Registration order is help order.
from service.cli import spec_cmds  # noqa: F401  isort: skip

for _optional in ("catalog_cmds", "run_cmds", "data_cmds", "k8s_cmds", "report_cmds"):
    try:
        __import__(f"service.cli.{_optional}")
    except ModuleNotFoundError as _e:  # a command group not built yet
        if _e.name != f"service.cli.{_optional}":
            raise

__all__ = ["app", "main"]

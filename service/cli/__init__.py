"""The ``backbones`` command line: a thin typer layer over the service modules.

Each ``*_cmds`` module registers its commands on ``app``; heavy libraries (torch, timm, boto3,
kubernetes) are imported inside the commands that need them, so ``backbones validate`` stays
fast and torch-free.
"""

# ruff: noqa: I001  (import order is the help order)
from __future__ import annotations

# Registration order is help order: spec tools, local runs, data, Kubernetes, results.
from service.cli import (  # noqa: F401  (imported for their @app.command registrations)
    spec_cmds,
    catalog_cmds,
    run_cmds,
    data_cmds,
    k8s_cmds,
    report_cmds,
)
from service.cli._app import app, main

__all__ = ["app", "main"]

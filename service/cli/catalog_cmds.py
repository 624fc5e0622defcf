"""catalog: the curated backbones, their cost and ImageNet accuracy (no torch import)."""

from __future__ import annotations

import json

import typer

from service.cli._app import app


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


@app.command()
def catalog(
    as_json: bool = typer.Option(False, "--json", help="One JSON array, for machines."),
    paper: bool = typer.Option(False, "--paper", help="Only the paper's backbones."),
) -> None:
    """List the curated backbones: family, params, GMACs, input size, ImageNet-1k top-1.

    Any timm model name works in a spec; these are the ones with measured figures.
    """
    from service.catalog import entries

    rows = [e for e in entries() if e.paper or not paper]
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in rows], indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="backbones catalog", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("family")
    table.add_column("params M", justify="right")
    table.add_column("GMACs", justify="right")
    table.add_column("input", justify="right")
    table.add_column("top-1", justify="right")
    table.add_column("paper")
    table.add_column("available / note")
    for e in rows:
        table.add_row(
            e.name,
            e.family,
            _num(e.params_m, ".1f"),
            _num(e.gmacs, ".2f"),
            str(e.input_size),
            _num(e.imagenet_top1, ".1f"),
            "yes" if e.paper else "",
            "yes" if e.available else f"no: {e.note}",
        )
    Console(soft_wrap=False).print(table)
    typer.echo("top-1: ImageNet-1k of the weights `weights: timm` loads; sources: --json")

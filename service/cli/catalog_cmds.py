"""catalog: the curated backbones, their cost and ImageNet accuracy (no torch import)."""

from __future__ import annotations

import json
import sys

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
    from service.backbones.catalog import entries

    entries_ = [e for e in entries() if e.paper or not paper]
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries_], indent=2))
        return
    headers = ["name", "family", "params M", "GMACs", "input", "top-1", "paper", "available"]
    right = {"params M", "GMACs", "input", "top-1"}
    rows = [
        [
            e.name,
            e.family,
            _num(e.params_m, ".1f"),
            _num(e.gmacs, ".2f"),
            str(e.input_size),
            _num(e.imagenet_top1, ".1f"),
            "yes" if e.paper else "",
            "yes" if e.available else f"no: {e.note}",
        ]
        for e in entries_
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="backbones catalog", title_justify="left")
        for h in headers:
            table.add_column(h, justify="right" if h in right else "left", no_wrap=h == "name")
        for row in rows:
            table.add_row(*row)
        Console(soft_wrap=False).print(table)
    else:
        # Piped or redirected: plain columns, never cut, for grep, awk and files.
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            out = [
                c.rjust(w) if h in right else c.ljust(w)
                for c, w, h in zip(cells, widths, headers, strict=True)
            ]
            return "  ".join(out).rstrip()

        typer.echo(line(headers))
        for row in rows:
            typer.echo(line(row))
    typer.echo("top-1: ImageNet-1k of the weights `weights: timm` loads; sources: --json")

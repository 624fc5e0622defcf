"""report, recommend: read a study's outputs and say which backbone to use (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from service.cli._app import app, edge, err
from service.errors import UserError

_URI_HELP = (
    "The study's output prefix: its output.uri (local folder or s3://bucket/prefix) or the "
    "<study> folder under it."
)
_SPEC_HELP = (
    "The Study spec: lists the expected cells exactly, so missing ones are named (else the "
    "grid is inferred from the outputs); its storage section reaches S3."
)


def _study(path: Path | None):
    if path is None:
        return None
    from service.spec import SpecError, Study, load_spec

    try:
        spec = load_spec(path)
    except SpecError as e:
        raise UserError(f"{path}: {e}") from None
    if not isinstance(spec, Study):
        raise UserError(f"{path}: expected a Study spec, got kind {spec.kind!r}")
    return spec


@app.command()
def report(
    uri: str = typer.Argument(..., help=_URI_HELP),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for the report files."),
    spec: Path | None = typer.Option(None, "--spec", help=_SPEC_HELP),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the PNG figures."),
) -> None:
    """Write leaderboard.csv/.json, report.md and a self-contained report.html for a study."""
    from service.report import build_report

    with edge():
        study = _study(spec)
        written = build_report(
            uri, out, study=study, storage=study.storage if study else None, plots=plots
        )
        c = written.report.counts
        typer.echo(
            f"{c['done']}/{c['cells']} cells done: {c['failed']} failed, {c['incomplete']} not "
            f"finished, {c['missing']} missing, {c['unreadable']} unreadable"
            + (f", {c['stale']} from another spec" if c["stale"] else "")
            + f" ({c['datasets']} datasets, {c['backbones']} backbones)"
        )
        if written.report.leaky_runs:
            typer.echo(
                f"warning: {len(written.report.leaky_runs)} run(s) selected on the test split "
                "(leaky); see the report"
            )
        for path in written.files:
            typer.echo(f"wrote {path}")


@app.command()
def compare(
    uri_a: str = typer.Argument(..., help="Output prefix of study A (e.g. the faithful one)."),
    uri_b: str = typer.Argument(..., help="Output prefix of study B (e.g. the fixed one)."),
    spec_a: Path | None = typer.Option(None, "--spec-a", help="Study spec of A (see --spec-b)."),
    spec_b: Path | None = typer.Option(None, "--spec-b", help="Study spec of B. " + _SPEC_HELP),
    label_a: str = typer.Option("A", "--label-a", help="Name of A in the tables."),
    label_b: str = typer.Option("B", "--label-b", help="Name of B in the tables."),
    out: Path = typer.Option(Path("compare"), "--out", help="Folder for compare.md/.json."),
) -> None:
    """Rankings of two studies of the same grid side by side (e.g. the paper's faithful
    protocol vs the fixed one): per dataset and domain, with the significance flags. Exit 2
    when the grids share no dataset or no backbone; other grid differences are listed."""
    from service.report import load
    from service.report.compare import compare as compare_reports
    from service.report.compare import grid_differences, to_json, to_markdown

    with edge():
        study_a, study_b = _study(spec_a), _study(spec_b)
        _, a = load(uri_a, study=study_a, storage=study_a.storage if study_a else None)
        _, b = load(uri_b, study=study_b, storage=study_b.storage if study_b else None)
        result = compare_reports(a, b, label_a, label_b)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(to_markdown(result), encoding="utf-8")
        (out / "compare.json").write_text(json.dumps(to_json(result), indent=2) + "\n")
        changed = sum(d.leader_changed for d in result.datasets)
        typer.echo(f"{len(result.datasets)} datasets compared: the leader changes on {changed}")
        for line in grid_differences(result):
            err(f"warning: {line}")
        typer.echo(f"wrote {out / 'compare.md'}")
        typer.echo(f"wrote {out / 'compare.json'}")


@app.command()
def recommend(
    uri: str = typer.Argument(..., help=_URI_HELP),
    dataset: str = typer.Option(..., "--dataset", help="Dataset short name, as in run ids."),
    max_gmacs: float | None = typer.Option(
        None, "--max-gmacs", min=0, help="Only backbones with at most this many GMACs per image."
    ),
    max_params: float | None = typer.Option(
        None, "--max-params", min=0, help="Only backbones with at most this many million params."
    ),
    fraction: float | None = typer.Option(
        None, "--fraction", help="Train fraction to judge on; default the dataset's largest."
    ),
    spec: Path | None = typer.Option(None, "--spec", help=_SPEC_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """The best backbone for a dataset within limits, and the runners-up not significantly worse."""
    from service.report import load
    from service.report.recommend import format_text
    from service.report.recommend import recommend as pick

    with edge():
        study = _study(spec)
        _, rep = load(uri, study=study, storage=study.storage if study else None)
        rec = pick(rep, dataset, max_gmacs=max_gmacs, max_params=max_params, fraction=fraction)
        if as_json:
            typer.echo(json.dumps(rec.to_dict(), indent=2))
        else:
            typer.echo(format_text(rec))


@app.command()
def budget(
    spec_file: Path = typer.Argument(..., metavar="STUDY", help="A Study spec (JSON)."),
    online: bool = typer.Option(
        False,
        "--online",
        help="Also read dataset manifests on S3 (default: offline). Wrong credentials exit 2, "
        "an unreachable store 75.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the breakdown as JSON."),
    gpu: str = typer.Option(
        None,
        "--gpu",
        help="Estimate for this GPU: a reference (A100-80GB, H100-SXM) or a device calibrated "
        "in the study's output store (default: A100-80GB).",
    ),
    calibrate: bool = typer.Option(
        False,
        "--calibrate",
        help="First measure each backbone's training step rate on this machine's device and "
        "store the table in the study's output store, keyed by the device's name.",
    ),
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps per backbone (--calibrate)."),
) -> None:
    """GPU-hours of a Study per dataset × backbone × fraction, and how they were estimated."""
    from service.cost.budget import DEFAULT_REFERENCE, estimate

    with edge():
        study = _study(spec_file)
        if calibrate:
            from service.cost.calibrate import calibrate as measure

            gpu, rows = measure(study, steps=steps, warmup=max(2, steps // 5))
            for model, row in rows.items():
                err(f"calibrated {model} on {gpu}: {row['images_per_second']:.1f} img/s")
        est = estimate(study, online=online, reference=gpu or DEFAULT_REFERENCE)
        if as_json:
            typer.echo(json.dumps(est.to_dict(), indent=2))
            return
        typer.echo(est.line())
        for c in est.cells:
            typer.echo(
                f"  {c.dataset} {c.backbone} frac {c.train_fraction:g} × {c.seeds} seeds: "
                f"{c.gpu_hours:.2f} GPU-h ({c.image_size[0]}x{c.image_size[1]} px, "
                f"{c.gmacs:.3g} GMACs [{c.gmacs_source}], "
                f"{c.train_images} train images [{c.images_source}], {c.epochs} epochs, "
                f"{c.images_per_second:.0f} img/s [{c.speed_source}], "
                f"overhead {c.overhead_seconds:.0f} s/cell)"
            )
        for note in est.notes:
            typer.echo(f"note: {note}")
        for line in _assumed_sizes(study, est, online):
            err(f"warning: {line}")


def _assumed_sizes(study, est, online: bool) -> list[str]:
    """One line per dataset whose image count was assumed, not read, and how to read it."""
    from service.cost.budget import DEFAULT_TRAIN_IMAGES

    out = []
    for name, source in dict.fromkeys((c.dataset, c.images_source) for c in est.cells):
        if not source.startswith("default"):
            continue
        uri = next(d.uri for d in study.datasets if d.short_name == name)
        how = (
            "pass --online to read its manifest"
            if uri.startswith("s3://") and not online
            else "no manifest or countable files there"
        )
        out.append(
            f"{name}: image count not read ({uri}: {how}); assumed {DEFAULT_TRAIN_IMAGES} "
            "train images: set dataset.expected_images for a real estimate"
        )
    return out

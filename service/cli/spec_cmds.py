"""validate, schema, expand: spec-only commands (no torch, no network)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer

from service.cli._app import app, edge, err, load_or_exit
from service.errors import EXIT_USER
from service.spec import SpecError, load_spec

SCHEMA_DIR = Path("jobspecs/schema")


@app.command()
def validate(
    files: list[Path] = typer.Argument(..., help="Spec files (JSON)."),
    deep: bool = typer.Option(
        False,
        "--deep",
        help="Also check model names against timm's registry, and build every (backbone, "
        "image size) pair on the meta device to refuse pairs that cannot run (imports torch).",
    ),
) -> None:
    """Check specs; print 'ok: FILE (...)' or one line per problem. Exit 2 if any is invalid."""
    failed = False
    for path in files:
        spec, problems, notes = _check(path, deep)
        if problems:
            failed = True
            for loc, msg in problems:
                err(f"{path}: {loc}: {msg}" if loc else f"{path}: {msg}")
            continue
        for warning in spec.resources.warnings():
            err(f"warning: {path}: {warning}")
        if spec.kind == "Study":
            line = f"ok: {path} (Study {spec.name}, {spec.n_cells} cells"
            try:
                from service.cost.budget import estimate, gmacs_fallbacks

                est = estimate(spec)
                line += f", ~{est.gpu_hours:.1f} GPU-hours"
                if fallbacks := gmacs_fallbacks(est):
                    line += f", speed from GMACs for {', '.join(fallbacks)} (not benchmarked)"
                if spec.search.strategy == "successive_halving":
                    from service.search.plan import epoch_fraction

                    line += f" for the grid; the search trains ~{epoch_fraction(spec):.0%} of "
                    line += f"its epochs, at most {epoch_fraction(spec, worst=True):.0%} when "
                    line += "its cuts keep candidates they cannot tell apart"
            except (ImportError, ArithmeticError, ValueError):
                pass  # the estimate is a courtesy; absurd sizes must not fail validation
            typer.echo(line + ")")
            _echo_deadline(spec)
        else:
            typer.echo(f"ok: {path} (FineTune {spec.name})")
        for note in notes:
            typer.echo(f"  {note}")
    if failed:
        raise typer.Exit(EXIT_USER)


def _echo_deadline(spec) -> None:
    """The Study Job's activeDeadlineSeconds (derived ones are capped: docs/kubernetes.md)."""
    from service.cost.deadline import deadline_line

    with contextlib.suppress(ImportError, ArithmeticError, ValueError):  # a courtesy
        typer.echo(deadline_line(spec))


def _check(path: Path, deep: bool):
    """(spec, problems, notes) for one file: the schema, model names, image sizes (the shipped
    size rules; every pair built with --deep) and a search's rung plan."""
    from service.backbones.checks import check_models, check_resolutions, check_size_rules

    notes: list[str] = []
    try:
        spec = load_spec(path)
        problems = check_models(spec, deep=deep)
        if not problems and deep:
            problems = check_resolutions(spec)
        elif not problems:
            problems, unknown = check_size_rules(spec)
            if unknown:
                notes.append(
                    f"image sizes not checked for {', '.join(unknown)} (no shipped size rule): "
                    "`backbones validate --deep` builds each pair to check it"
                )
        if not problems and spec.kind == "Study" and spec.search.strategy != "grid":
            from service.search.plan import plan_lines, plan_problems

            problems = plan_problems(spec)
            notes += plan_lines(spec)
    except SpecError as e:
        return None, e.problems, []
    except OSError as e:
        return None, [("", e.strerror or str(e))], []
    return spec, problems, notes


def schemas() -> dict[str, dict]:
    """JSON Schema of each kind, keyed by file name."""
    from service.spec import FineTune, Study

    out = {}
    for model, fname in ((FineTune, "finetune.schema.json"), (Study, "study.schema.json")):
        schema = model.model_json_schema(by_alias=True, mode="validation")
        schema["$id"] = f"https://backbones.dev/schema/v1/{fname}"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[fname] = schema
    return out


@app.command()
def schema(
    out_dir: Path = typer.Option(SCHEMA_DIR, "--out", help="Folder to write the schemas into."),
) -> None:
    """Write the JSON Schema of both kinds (FineTune, Study) for editors and CI."""
    with edge():
        out_dir.mkdir(parents=True, exist_ok=True)
        for fname, body in schemas().items():
            (out_dir / fname).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
            typer.echo(f"wrote {out_dir / fname}")


@app.command()
def expand(file: Path = typer.Argument(..., help="A Study (or FineTune) spec.")) -> None:
    """Print the runs a spec becomes, one JSON object per line, in execution order, each with
    its effective protocol (the study's, with its dataset's overrides)."""
    from service.cost.packs import index_of_cells
    from service.spec.study import cells_of, effective

    with edge():
        spec = load_or_exit(file)
        pods = index_of_cells(spec) if getattr(spec.resources, "cells_per_pod", 1) != 1 else {}
        for i, cell in enumerate(cells_of(spec)):
            typer.echo(
                json.dumps(
                    {
                        "index": i,
                        # A packed Study: the Job index whose pod runs this cell.
                        **({"job_index": pods[i]} if pods else {}),
                        "run_id": cell.run_id,
                        "name": cell.name,
                        "protocol": effective(cell.protocol),
                        "spec": json.loads(cell.to_json()),
                    }
                )
            )

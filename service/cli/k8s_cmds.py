"""render, submit, status, logs, cancel: specs as Kubernetes Jobs.

``render`` needs no cluster (pure: service.k8s.render); the others go through
service.k8s.client, the only module that imports the ``kubernetes`` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from service.cli._app import app, edge, err, load_or_exit
from service.errors import UserError

_namespace_opt = typer.Option(
    None,
    "--namespace",
    "-n",
    help="Namespace (default: the spec's resources.namespace when it names one, else the "
    "kubeconfig context's namespace, else resources.namespace's default).",
)
_context_opt = typer.Option(None, "--context", help="kubeconfig context (default: current).")


def _cluster(namespace: str, context: str | None):
    from service.k8s.client import Cluster

    return Cluster.connect(namespace, context)


def namespace_for(namespace: str | None, context: str | None, spec=None) -> str:
    """One rule for submit, status, logs and cancel: -n; else the namespace the spec names
    (resources.namespace, when set); else the kubeconfig context's (or, in a pod, its own);
    else the default of resources.namespace, where a spec that names none goes."""
    from service.spec.infra import Resources

    if namespace:
        return namespace
    if spec is not None and "namespace" in spec.resources.model_fields_set:
        return spec.resources.namespace
    from service.k8s.client import context_namespace

    return context_namespace(context) or Resources.model_fields["namespace"].default


def _target(name: str | None, study: str | None, namespace: str | None, context: str | None):
    """(name, study, namespace) of status/logs/cancel; NAME may be a spec file, which names
    the Job (a search: the study's Jobs) and its namespace."""
    spec = None
    if name and name.endswith(".json") and Path(name).is_file():
        spec = load_or_exit(Path(name))
        name, study = (None, spec.name) if _searching(spec) else (spec.name, study)
    return name, study, namespace_for(namespace, context, spec)


def _render(
    spec_file: Path,
    image: str | None,
    namespace: str | None,
    context: str | None = None,
    *,
    submitting: bool = False,
):
    """The spec and its Job; submitting, in the namespace of `namespace_for` (render needs no
    kubeconfig: without -n it prints the spec's resources.namespace)."""
    from service.k8s.render import warnings_for
    from service.k8s.search_jobs import render_for

    spec = load_or_exit(spec_file)
    if submitting:
        namespace = namespace_for(namespace, context, spec)
    job = render_for(spec, image=image, namespace=namespace)
    for warning in warnings_for(spec):
        err(f"warning: {warning}")
    return spec, job


@app.command()
def render(
    spec_file: Path = typer.Argument(..., help="FineTune or Study spec (JSON)."),
    image: str = typer.Option(
        None, "--image", help="Container image, pinned by tag or digest (default: this release)."
    ),
    output: str = typer.Option("yaml", "--output", "-o", help="yaml or json."),
    namespace: str = _namespace_opt,
) -> None:
    """Print the Kubernetes Job for a spec: `backbones render spec.json | kubectl apply -f -`."""
    from service.k8s.render import to_json, to_yaml

    with edge():
        if output not in ("yaml", "json"):
            err(f"error: --output: must be 'yaml' or 'json', got {output!r}")
            raise typer.Exit(2)
        _, job = _render(spec_file, image, namespace)
        sys.stdout.write(to_yaml(job) if output == "yaml" else to_json(job))


@app.command()
def submit(
    spec_file: Path = typer.Argument(..., help="FineTune or Study spec (JSON)."),
    image: str = typer.Option(None, "--image", help="Container image, pinned by tag or digest."),
    namespace: str = _namespace_opt,
    replace: bool = typer.Option(
        False,
        "--replace",
        help="A Job of this name is running another spec (or resources, image): delete it, "
        "then create. Finished and failed Jobs are replaced without it.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Server-side dry run: admission and validation, nothing stored."
    ),
    yes: bool = typer.Option(False, "--yes", help="Submit even above the study's max_gpu_hours."),
    deep: bool = typer.Option(
        False,
        "--deep",
        help="First check as `validate --deep` does (every backbone and image size pair built "
        "on the meta device); refuse the spec before any Job exists if one cannot run.",
    ),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="A Study with a search: run its driver here, submitting one Indexed Job per rung "
        "and waiting for each (killed, it resumes from the output store). Without it the "
        "driver itself runs as a Job in the cluster.",
    ),
    context: str = _context_opt,
) -> None:
    """Create the Job for a spec (kubeconfig or in-cluster credentials)."""
    from service.cost.budget import check_budget
    from service.k8s.ops import submit as do_submit
    from service.spec import Study

    with edge():
        spec, job = _render(spec_file, image, namespace, context, submitting=True)
        if deep:
            from service.backbones.checks import check_models, check_resolutions

            problems = check_models(spec, deep=True) or check_resolutions(spec)
            if problems:
                raise UserError(f"{spec_file}: " + "; ".join(f"{k}: {m}" for k, m in problems))
        if follow:
            from service.cli.search_cmds import drive_on_cluster

            if not _searching(spec):
                raise UserError(
                    "--follow: only a Study with a successive-halving search has a driver"
                )
            check_budget(spec, yes, online=True, warn=err)
            cluster = _cluster(job["metadata"]["namespace"], context)
            return drive_on_cluster(spec, cluster, image=image)
        if isinstance(spec, Study):
            # Reads dataset manifests on S3 when it can: a tighter estimate than validate's.
            err(check_budget(spec, yes, online=True, warn=err).line())
        cluster = _cluster(job["metadata"]["namespace"], context)
        done = do_submit(cluster, job, replace=replace, dry_run=dry_run, say=err)
        typer.echo(done.line())


@app.command()
def status(
    name: str = typer.Argument(
        None, help="Job name (a FineTune's or Study's name), or the spec file itself."
    ),
    study: str = typer.Option(None, "--study", help="All Jobs of this study."),
    namespace: str = _namespace_opt,
    context: str = _context_opt,
) -> None:
    """Phase, progress, ETA, best validation accuracy, attempts and age of each run."""
    from service.k8s.ops import check_selection, status_rows

    with edge():
        check_selection(name, study)
        name, study, namespace = _target(name, study, namespace, context)
        cluster = _cluster(namespace, context)
        rows = status_rows(cluster, name, study)
        print_rows(rows)
        if study:
            from service.k8s.search_jobs import search_status

            for line in search_status(cluster, study):
                typer.echo(line)
            for line in _remaining(cluster, study):
                typer.echo(line)


def _remaining(cluster, study: str) -> list[str]:
    """The study's GPU-hours left, re-estimated from its finished cells (service.cost.spent);
    a store it cannot read is a warning, never a failed status."""
    from service.cost.spent import remaining_line
    from service.k8s.ops import select_jobs
    from service.k8s.render import spec_from_job
    from service.spec import Study

    for job in select_jobs(cluster, None, study):
        try:
            spec = spec_from_job(job)
        except Exception:
            continue
        if isinstance(spec, Study):
            try:
                return [remaining_line(spec)]
            except Exception as e:
                err(f"warning: study {study}: remaining GPU-hours not re-estimated: {e}")
                return []
    return []


def print_rows(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    from service.k8s.status import duration

    if not rows:
        typer.echo("no backbones Jobs found")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("JOB", "RUN", "PHASE", "PROGRESS", "ETA", "BEST VAL", "ATTEMPTS", "AGE"):
        table.add_column(col, justify="right" if col in ("PROGRESS", "BEST VAL") else "left")
    for r in rows:
        table.add_row(
            r.job if r.index is None else f"{r.job}[{r.index}]",
            r.run,
            r.phase,
            "-" if r.progress is None else f"{100 * r.progress:.0f}%",
            duration(r.eta_seconds),
            "-" if r.best_val_top1 is None else f"{100 * r.best_val_top1:.1f}%",
            str(r.attempts),
            duration(r.age_seconds),
        )
    # Piped output keeps whole run ids (rich would cut them to 80 columns).
    console = Console() if sys.stdout.isatty() else Console(width=400)
    console.print(table)
    for r in rows:
        if r.error:
            err(f"{r.run}: {r.error}")


@app.command()
def logs(
    name: str = typer.Argument(..., help="Job name, or the spec file itself."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Stream, across retries, until the Job ends."
    ),
    index: int = typer.Option(None, "--index", help="Cell of a Study (JOB_COMPLETION_INDEX)."),
    namespace: str = _namespace_opt,
    context: str = _context_opt,
) -> None:
    """Print the worker's log (the newest pod of the Job, or of one Study cell)."""
    from service.k8s.ops import stream_logs

    with edge():
        name, study, namespace = _target(name, None, namespace, context)
        if study:  # a search spec: its driver's log
            from service.k8s.search_jobs import driver_job_name

            name = driver_job_name(study)
        cluster = _cluster(namespace, context)
        job = cluster.get_job(name)
        js = job["spec"]
        # A Study's Job, a rung's (its cells only) or the search driver's (one pod, container
        # 'driver'): the Job itself says how many indexes and which container.
        cells = (js.get("completions") or 1) if js.get("completionMode") == "Indexed" else 1
        container = js["template"]["spec"]["containers"][0]["name"]
        # -f: waits for a starting pod, and follows a retry's new pod until the Job ends.
        for chunk in stream_logs(cluster, name, container, index, cells, follow, say=err):
            sys.stdout.write(chunk)
            sys.stdout.flush()


@app.command()
def cancel(
    name: str = typer.Argument(None, help="Job name, or the spec file itself."),
    study: str = typer.Option(None, "--study", help="Every Job of this study."),
    namespace: str = _namespace_opt,
    context: str = _context_opt,
) -> None:
    """Delete Jobs; their pods get SIGTERM, write a checkpoint and exit. Outputs stay."""
    from service.k8s.ops import cancel as do_cancel
    from service.k8s.ops import check_selection

    with edge():
        check_selection(name, study, required=True)
        name, study, namespace = _target(name, study, namespace, context)
        for n in do_cancel(_cluster(namespace, context), name, study):
            typer.echo(f"cancelled Job {namespace}/{n} (pods checkpoint and stop; outputs stay)")


def _searching(spec) -> bool:
    from service.k8s.search_jobs import searching

    return searching(spec)


@app.command("search-driver", hidden=True)
def search_driver() -> None:
    """The in-cluster driver's entry point: the Study in $BACKBONES_SPEC, this namespace."""
    import os

    from service.cli.search_cmds import drive_on_cluster
    from service.run.worker import read_spec

    with edge():
        spec = read_spec(None)
        if not _searching(spec):
            raise UserError("BACKBONES_SPEC: the search driver needs a Study with a search")
        namespace = os.environ.get("BACKBONES_NAMESPACE") or spec.resources.namespace
        image = os.environ.get("BACKBONES_IMAGE")
        drive_on_cluster(spec, _cluster(namespace, None), image=image, in_cluster=True)

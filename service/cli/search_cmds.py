"""The successive-halving search on this machine: `backbones run STUDY` with a `search`."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from service.cli._app import err
from service.errors import UserError


def run_search(study, *, force: bool, cache_dir: Path | None) -> None:
    from service.run.worker import console_observers, stop_on_signals
    from service.search.driver import Driver, LocalRunner, search_store

    if force:
        raise UserError(
            "--force does not apply to a search (its rungs resume from the store); delete "
            f"{search_store(study).uri} and the study's runs to start over"
        )
    stop = threading.Event()
    runner = LocalRunner(
        stop=stop,
        cache_dir=cache_dir,
        observers=lambda c: console_observers(c.spec.run_id),
        echo=typer.echo,
        err=err,
    )
    # The cells serve /metrics on metrics.port in this process: the driver only pushes.
    metrics = _metrics(study, port=0)
    with stop_on_signals(stop):
        state = Driver(
            study, runner, proxy=_proxy(cache_dir), echo=typer.echo, on_state=metrics
        ).run()
    for key, winner in state["winners"].items():
        typer.echo(f"{key}: best backbone {winner}")
    typer.echo(f"search state: {search_store(study).uri}/state.json")


def _proxy(cache_dir: Path | None):
    def run(study, group):
        from service.search.proxy import proxy_scores

        return proxy_scores(study, group, cache_dir=cache_dir)

    return run


def drive_on_cluster(study, cluster, *, image: str | None, in_cluster: bool = False) -> None:
    """The driver with one Indexed Job per rung; its state in the output store."""
    from service.k8s.ops import check_local_queue
    from service.k8s.search_jobs import ClusterRunner
    from service.search.driver import Driver, search_store

    if not in_cluster:  # each rung's Job goes to this queue: it must be there
        check_local_queue(cluster, study.resources.queue)
    runner = ClusterRunner(cluster, study, image=image, say=err)
    metrics = _metrics(study, port=study.metrics.port if in_cluster else 0)
    state = Driver(study, runner, proxy=_proxy(None), echo=typer.echo, on_state=metrics).run()
    for key, winner in state["winners"].items():
        typer.echo(f"{key}: best backbone {winner}")
    typer.echo(f"search state: {search_store(study).uri}/state.json")


def _metrics(study, *, port: int):
    """The driver's gauges (rung, survivors) as an on_state callback; None without anywhere to
    send them."""
    if not port and not study.metrics.pushgateway_url:
        return None
    from service.run.metrics import SearchMetrics

    m = SearchMetrics(study.name, port=port, pushgateway_url=study.metrics.pushgateway_url)
    return m.update

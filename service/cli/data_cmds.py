"""``backbones dataset push|inspect`` and ``backbones weights push``: getting inputs into S3.

S3 access: credentials only from the standard AWS environment and credential chain; the
endpoint from ``--endpoint-url`` or boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from service.cli._app import app, edge

dataset_app = typer.Typer(
    help="Push datasets to S3 (packed shards) and inspect them.", no_args_is_help=True
)
weights_app = typer.Typer(
    help="Store pretrained weights in S3 for air-gapped clusters.", no_args_is_help=True
)
app.add_typer(dataset_app, name="dataset")
app.add_typer(weights_app, name="weights")

_endpoint_opt = typer.Option(
    None,
    "--endpoint-url",
    help="S3 endpoint of MinIO/SeaweedFS/Ceph (default: $AWS_ENDPOINT_URL_S3, else AWS).",
)
_region_opt = typer.Option(None, "--region", help="Region for signing (default: us-east-1).")
_style_opt = typer.Option("path", "--addressing-style", help="path, virtual or auto.")
_concurrency_opt = typer.Option(16, "--max-concurrency", help="Parallel transfers.", min=1)


def _storage(endpoint_url, region, addressing_style, max_concurrency):
    from service.spec import Storage

    try:
        return Storage(
            endpoint_url=endpoint_url,
            region=region or "us-east-1",
            addressing_style=addressing_style,
            max_concurrency=max_concurrency,
        )
    except ValueError as e:  # pydantic: name the option, one line
        from service.errors import UserError

        first = e.errors()[0] if hasattr(e, "errors") else {"msg": str(e), "loc": ()}
        field = first["loc"][0] if first["loc"] else "storage"
        raise UserError(f"--{str(field).replace('_', '-')}: {first['msg']}") from None


@dataset_app.command("push")
def dataset_push(
    src: Path = typer.Argument(
        ..., help="ImageFolder (train/ [val/] test/) or one folder of class subfolders."
    ),
    dest: str = typer.Argument(..., help="s3://bucket/prefix/name/ (or a local folder)."),
    name: str = typer.Option(None, "--name", help="Dataset name (default: last part of DEST)."),
    test_fraction: float = typer.Option(
        None, "--test-fraction", help="Carve a stratified test split (class-folder source)."
    ),
    val_fraction: float = typer.Option(
        None,
        "--val-fraction",
        help="Carve a stratified val split: this fraction of the whole folder "
        "(class-folder source).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the stratified split."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Say what would be uploaded; upload nothing."
    ),
    shard_mb: int = typer.Option(64, "--shard-mb", help="Target shard size in MiB.", min=1),
    endpoint_url: str = _endpoint_opt,
    region: str = _region_opt,
    addressing_style: str = _style_opt,
    max_concurrency: int = _concurrency_opt,
) -> None:
    """Pack images into tar shards + manifest.json and upload what changed."""
    from service.data.push import push

    with edge():
        storage = _storage(endpoint_url, region, addressing_style, max_concurrency)
        result = push(
            src,
            dest,
            storage,
            name=name,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            seed=seed,
            dry_run=dry_run,
            shard_bytes=shard_mb * 1024 * 1024,
            echo=lambda line: typer.echo(line, err=True),
        )
        for line in result.lines():
            typer.echo(line)


@dataset_app.command("inspect")
def dataset_inspect(
    uri: str = typer.Argument(..., help="s3://… or a local folder/archive."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
    cache_dir: Path = typer.Option(
        None,
        "--cache-dir",
        help="Where s3:// data is fetched (default: $BACKBONES_CACHE, else ~/.cache/backbones).",
    ),
    endpoint_url: str = _endpoint_opt,
    region: str = _region_opt,
    addressing_style: str = _style_opt,
    max_concurrency: int = _concurrency_opt,
) -> None:
    """Print a dataset card: counts, imbalance, undecodable files, duplicates, sizes, modes."""
    from service.data.card import inspect_uri, render, to_json

    with edge():
        storage = _storage(endpoint_url, region, addressing_style, max_concurrency)
        c = inspect_uri(uri, storage, cache_dir)
        typer.echo(to_json(c) if as_json else render(c))


@weights_app.command("push")
def weights_push(
    model: str = typer.Argument(..., help="timm model name (needs the hub) or a local file."),
    dest: str = typer.Argument(
        ..., help="s3://bucket/prefix/ (→ <model>.safetensors) or …/name.safetensors."
    ),
    endpoint_url: str = _endpoint_opt,
    region: str = _region_opt,
    addressing_style: str = _style_opt,
    max_concurrency: int = _concurrency_opt,
) -> None:
    """Store a model's pretrained weights as safetensors (plus a .sha256 sidecar)."""
    from service.backbones.weights_push import push_weights

    with edge():
        storage = _storage(endpoint_url, region, addressing_style, max_concurrency)
        p = push_weights(model, dest, storage)
        typer.echo(
            f"{p.uri}: {p.tensors} tensors, {p.size / 2**20:.1f} MiB, sha256 {p.sha256} "
            f"(from {p.source})"
        )
        typer.echo(f'use it with: "backbone": {{"weights": "{p.uri}"}}')

"""The zero-training rung: a k-NN probe on frozen pretrained features.

Each candidate embeds the train and validation splits once (its pooled pre-logits features,
no gradient, no augmentation), and a cosine k-nearest-neighbour vote over the train features
classifies the validation images: the score is that validation accuracy. One forward pass per
image and candidate; the split is the study's first seed's. Published comparisons find such
scores useful to prune candidates and unreliable to pick the winner, so a proxy only prunes to
``keep`` before the first training rung.
"""

from __future__ import annotations

import logging

import torch

from service.errors import UserError
from service.search.plan import Group
from service.spec import Study

log = logging.getLogger("backbones.search")


def proxy_scores(study: Study, group: Group, *, cache_dir=None) -> dict[str, float | None]:
    """Backbone -> k-NN validation accuracy on frozen features, for one group.

    The data comes the way training gets it (``pipeline.prepare_data``: fetched from S3 into
    the one cache when the URI is remote, then decoded and split), and each split is normalised
    as training normalises it (``split_stats``), so the proxy scores the inputs training sees."""
    from service.backbones import factory as models
    from service.backbones.checks import require_size
    from service.data.normalise import split_stats
    from service.run.cell import cache_root
    from service.run.pipeline import prepare_data
    from service.train.runtime import seed_everything

    proxy = study.search.proxy
    first = next(iter(group.cells.values()))[0]
    cache = cache_root(first, cache_dir)
    data = prepare_data(first, cache)
    out: dict[str, float | None] = {}
    for backbone, cells in group.cells.items():
        cell = cells[0]
        try:  # a candidate that cannot run at this size fails alone (no score), as in a rung
            require_size(backbone, cell.protocol.hw)
        except UserError as e:
            log.warning("proxy: %s: %s", group.key, e)
            out[backbone] = None
            continue
        seed_everything(cell.protocol.seed)
        built = models.build(
            cell.backbone,
            len(data.classes),
            cache_dir=cache,
            storage=cell.storage,
            image_size=cell.protocol.hw,
        )
        p = cell.protocol
        stats = split_stats(p.normalize, data, built)
        train = features(built.model, data.train, p.batch_size, *stats["train"])
        val = features(built.model, data.val, p.batch_size, *stats["val"])
        out[backbone] = knn_accuracy(
            train, data.train.labels, val, data.val.labels, k=proxy.k, n_classes=len(data.classes)
        )
    return out


@torch.no_grad()
def features(model, split, batch_size: int, mean, std) -> torch.Tensor:
    from service.data import BatchLoader

    model.eval()
    loader = BatchLoader(
        split, batch_size, device="cpu", mean=mean, std=std, shuffle=False, augment=False, seed=0
    )
    chunks = []
    for x, _ in loader.epoch(0):
        chunks.append(pooled(model, x).float())
    return torch.cat(chunks)


def pooled(model, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits features: timm's forward_head(pre_logits=True), else the input of the last
    Linear layer (torchvision)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    from service.backbones.weights import last_linear

    captured = {}
    _, linear = last_linear(model)
    handle = linear.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured["x"].flatten(1)


def knn_accuracy(
    train: torch.Tensor, train_y, val: torch.Tensor, val_y, *, k: int, n_classes: int
) -> float:
    """Cosine k-NN (majority vote, ties to the nearest neighbour's class) accuracy on val."""
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    val_y = torch.as_tensor(val_y, dtype=torch.long)
    a = torch.nn.functional.normalize(train, dim=1)
    b = torch.nn.functional.normalize(val, dim=1)
    k = min(k, len(a))
    correct = 0
    for start in range(0, len(b), 1024):
        sims = b[start : start + 1024] @ a.T
        idx = sims.topk(k, dim=1).indices
        votes = torch.zeros(len(idx), n_classes)
        # weight a neighbour's vote slightly by its rank so ties go to the nearest
        weights = 1.0 + 1e-3 * torch.arange(k, 0, -1, dtype=torch.float32)
        votes.scatter_add_(1, train_y[idx], weights.expand(len(idx), k).contiguous())
        correct += int((votes.argmax(1) == val_y[start : start + 1024]).sum())
    return correct / max(len(b), 1)

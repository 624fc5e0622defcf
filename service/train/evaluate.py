"""Evaluation: run a split once, then compute every metric over samples (not batch means).

The paper averaged per-batch accuracies, which overweights a short last batch; here logits of
the whole split are gathered first and every figure is computed once, with scikit-learn.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


@torch.no_grad()
def predict(
    model, batches, *, autocast, micro_batch: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 on CPU, labels) of every sample the loader yields, in order.

    ``micro_batch``: at most that many images per forward pass (the trainer's micro-batch: what
    fits with gradients fits without them), so an evaluation batch as large as the training
    batch never runs out of memory where training had to split it. Logits stay on the device
    until the split ends: one copy to the host, not a synchronising one a batch."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        for part in micro_batches(y.shape[0], micro_batch):
            with autocast():
                out = model(x[part])
            logits.append(out.float())
            labels.append(y[part])
    model.train(was_training)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def micro_batches(n: int, micro_batch: int | None) -> list[slice]:
    """Slices of a batch of ``n``, ``micro_batch`` at a time (the whole batch when None)."""
    step = micro_batch if micro_batch and micro_batch > 0 else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def quick_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """What each epoch's validation needs: loss, top-1 and macro-F1."""
    from sklearn.metrics import f1_score

    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    k = logits.shape[1]
    return {
        "loss": float(F.cross_entropy(logits, labels).item()),
        "top1": float((pred == y).mean()),
        "macro_f1": float(
            f1_score(y, pred, labels=list(range(k)), average="macro", zero_division=0)
        ),
    }


def full_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The summary's ``test`` block."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score

    k = logits.shape[1]
    probs = logits.softmax(1).numpy().astype(np.float64)
    y = labels.numpy()
    pred = probs.argmax(1)
    classes = list(range(k))
    out = quick_metrics(logits, labels)
    out["top5"] = top_k(probs, y, 5) if k >= 5 else None
    out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    out["per_class_recall"] = [
        float(r) for r in recall_score(y, pred, labels=classes, average=None, zero_division=0)
    ]
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=classes).tolist()
    out["ece"] = expected_calibration_error(probs, y)
    out["auroc"] = auroc_binary(probs, y) if k == 2 else None
    return out


def top_k(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(1).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sample-weighted |accuracy - confidence| over equal-width confidence bins."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def auroc_binary(probs: np.ndarray, y: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None  # undefined with one class present
    return float(roc_auc_score(y, probs[:, 1]))

"""Cells packed per pod: which cells of a Study share one Indexed Job index.

``resources.cells_per_pod`` (1 by default: one cell per pod, as before) groups cells that share
a dataset entry, so its dataset and resolution, onto one index. The pod runs them one after
another in one worker process (service.run.pack): one start-up, one fetch, one decode, the
same backbone's weights reused by its seeds. Each cell stays its own run.

The packs follow the expansion order (dataset, backbone, fraction, seed), so a pack holds one
backbone's seeds before the next backbone's, and a pack never mixes datasets. Index ``i`` of
the Job runs ``packs(study)[i]``: indexes into ``expand(study)``.

``"auto"`` picks the pack size per dataset from the offline budget estimate: the fewest cells
whose estimated training is at least ``AUTO_TRAIN_TO_OVERHEAD`` times the per-pod overhead
(``POD_OVERHEAD_SECONDS``), so the overhead is at most ~10% of what a pod bills; at most
``MAX_AUTO_PACK`` cells, so a preempted or failed pod redoes little and the grid still spreads
over many pods.
"""

from __future__ import annotations

import math

from service.spec.model import Study

# What a pod spends besides training on the reference GPU: scheduling, image pull, process start
# and imports, dataset fetch and decode, model build and weights, the micro-batch probe.
POD_OVERHEAD_SECONDS = 300.0
AUTO_TRAIN_TO_OVERHEAD = 9.0  # training >= 9x overhead: overhead <= 10% of the pod's wall
MAX_AUTO_PACK = 16


def _groups(study: Study) -> list[list[int]]:
    """Indexes into ``expand(study)`` per dataset entry (contiguous in expansion order)."""
    per = len(study.backbones) * len(study.train_fractions) * len(study.seeds)
    return [list(range(d * per, (d + 1) * per)) for d in range(len(study.datasets))]


def auto_size(train_seconds: float) -> int:
    """Cells per pod for cells of ``train_seconds`` estimated training each ("auto")."""
    if train_seconds <= 0:
        return MAX_AUTO_PACK
    want = math.ceil(AUTO_TRAIN_TO_OVERHEAD * POD_OVERHEAD_SECONDS / train_seconds)
    return max(1, min(MAX_AUTO_PACK, want))


def _auto_sizes(study: Study) -> list[int]:
    """The "auto" pack size of each dataset entry: from its cells' mean estimated training."""
    from service.cost.budget import estimate

    one_gpu = study.model_copy(update={"resources": study.resources.model_copy(update={"gpus": 1})})
    cells = estimate(one_gpu).cells
    sizes = []
    for dataset in study.datasets:
        mine = [c.gpu_hours_per_seed * 3600 for c in cells if c.dataset == dataset.short_name]
        sizes.append(auto_size(sum(mine) / len(mine) if mine else 0.0))
    return sizes


def pack_sizes(study: Study) -> list[int]:
    """Cells per pod for each dataset entry."""
    k = study.resources.cells_per_pod
    return _auto_sizes(study) if k == "auto" else [k] * len(study.datasets)


def packs(study: Study) -> list[list[int]]:
    """The cells (indexes into ``expand(study)``) each Job index runs, in index order."""
    if study.resources.cells_per_pod == 1:
        return [[i] for i in range(study.n_cells)]
    out: list[list[int]] = []
    for group, k in zip(_groups(study), pack_sizes(study), strict=True):
        out += [group[i : i + k] for i in range(0, len(group), k)]
    return out


def rung_packs(study: Study, groups: list[str]) -> list[list[int]]:
    """A search rung's packs: runs of consecutive rung cells of one group (a dataset), at most
    ``cells_per_pod`` each ("auto": the smallest of the datasets' auto sizes)."""
    if study.resources.cells_per_pod == 1:
        return [[i] for i in range(len(groups))]
    k = min(pack_sizes(study))
    out: list[list[int]] = []
    for i, group in enumerate(groups):
        if out and groups[out[-1][0]] == group and len(out[-1]) < k:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def packs_text(indexes: list[list[int]]) -> str:
    """Which cells each index runs, index by index: ``0-3,4-7,8``; the Job's annotation."""
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in indexes)


def parse_packs(text: str) -> list[list[int]]:
    """``packs_text`` read back (``backbones status``)."""
    out = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.append(list(range(int(first), int(last or first) + 1)))
    return out


def index_of_cells(study: Study) -> dict[int, int]:
    """Cell (index into ``expand``) -> the Job index that runs it."""
    return {cell: i for i, pack in enumerate(packs(study)) for cell in pack}

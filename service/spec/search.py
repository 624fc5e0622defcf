"""How a Study looks for the best backbone: ``Search``, and its optional ``Proxy`` rung."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from service.spec.sections import Section


class Proxy(Section):
    """A zero-training rung: rank candidates by their frozen pretrained features."""

    method: Literal["knn"] = Field(
        default="knn",
        description="'knn': accuracy of a k-nearest-neighbour classifier (cosine) on the frozen "
        "backbone's pooled features, fitted on the train split and scored on the validation "
        "split. One forward pass per image, no training.",
    )
    keep: int = Field(
        ge=1,
        description="Candidates (per dataset and train fraction) that go on to the first "
        "training rung, best proxy score first.",
    )
    k: int = Field(default=5, ge=1, description="Neighbours that vote in the k-NN probe.")


class Search(Section):
    """How a Study looks for the best backbone: the whole grid, or successive halving."""

    strategy: Literal["grid", "successive_halving"] = Field(
        default="grid",
        description="'grid': every cell, with the full protocol. 'successive_halving': per "
        "dataset and train fraction, every backbone trains on a small budget, the best 1/eta "
        "by validation top-1 (mean over seeds; never test) move on to an eta-times larger "
        "budget, and the last rung trains with the full protocol.",
    )
    eta: int = Field(
        default=3,
        ge=2,
        description="Successive halving: keep the best 1/eta of the candidates at each rung, "
        "and give the next rung eta times the epochs.",
    )
    min_epochs: int = Field(
        default=1,
        ge=1,
        description="Successive halving: the smallest rung's epoch budget is at least this.",
    )
    schedule: Literal["restart", "continue"] = Field(
        default="continue",
        description="Successive halving: how a rung spends its epochs. 'continue' (measured "
        "better, docs/search.md): every rung continues the previous rung's checkpoint under the "
        "full run's schedule, stopped at the rung's epoch budget. 'restart': each rung is a "
        "complete short schedule (protocol.max_epochs set to the rung's budget).",
    )
    proxy: Proxy | None = Field(
        default=None,
        description="Successive halving: an optional zero-training rung before the first one, "
        'e.g. {"method": "knn", "keep": 6}.',
    )

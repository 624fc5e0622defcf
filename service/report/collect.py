"""Find every cell of a study under an output prefix and read what each one left behind.

A cell lives at ``<prefix>/<study>/<dataset>/<backbone>/seed<S>-frac<F>/`` (the prefix may
also be the study folder itself). ``summary.json`` means done; otherwise ``status.json`` says
why not (a Failed phase with its error, or a run still going); nothing at all means the cell
never wrote output. Every expected cell comes back with a state and a reason: the report lists
the ones that are not done instead of dropping them.

The expected cells are exact when the Study spec is given (``expand(study)`` order). Without
it they are inferred: the grid is the product of the datasets, backbones, seeds and fractions
seen, so a cell missing from an otherwise complete row or column is still reported.

Outputs of plain FineTunes (``<prefix>/<name>/summary.json``, no study layout) are compared
too: each run is a cell placed by what its summary (or spec.json) says it trained.

Listing and reading go through ``open_store`` (local folder or S3) on a thread pool: on S3
each object is one round trip, and a study has thousands.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from service.errors import UserError
from service.outputs.contract import RunStatus, RunSummary, UnreadableOutput, check_version
from service.outputs.folder import SPEC, STATUS, SUMMARY
from service.spec import Storage, Study, run_id_for
from service.storage import NotFound, Store, import_for_threads, open_store

State = Literal["done", "failed", "incomplete", "missing", "unreadable", "stale"]

_CELL_FILE = re.compile(
    r"^(?P<dir>(?:(?P<study>.+)/)?(?P<dataset>[^/]+)/(?P<backbone>[^/]+)/"
    r"seed(?P<seed>\d+)-frac(?P<frac>[0-9.eE+-]+))/(?P<file>summary|status|spec)\.json$"
)
MAX_WORKERS = 32
_SEARCH_DIR = re.compile(r"(^|/)_search/")


@dataclass
class Cell:
    """One (dataset, backbone, seed, fraction) of the study and what became of it."""

    key: str  # the cell's folder, relative to the prefix
    dataset: str
    backbone: str
    seed: int
    fraction: float
    state: State = "missing"
    reason: str | None = "no output"
    summary: RunSummary | None = None  # read through the contract: typed, never a bare dict
    status: RunStatus | None = None
    domain: str | None = None
    spec_hash: str | None = None  # what the study spec expects, when it is known
    protocol: dict | None = None  # the spec's effective protocol for the cell, when known

    @property
    def ok(self) -> bool:
        return self.state == "done"


@dataclass
class Collection:
    uri: str
    study: str | None
    cells: list[Cell]
    grid: Literal["spec", "inferred"]
    notes: list[str] = field(default_factory=list)
    dataset_order: list[str] = field(default_factory=list)
    backbone_order: list[str] = field(default_factory=list)

    @property
    def done(self) -> list[Cell]:
        return [c for c in self.cells if c.ok]

    @property
    def problems(self) -> list[Cell]:
        return [c for c in self.cells if not c.ok]


def collect(
    uri: str,
    *,
    study: Study | None = None,
    storage: Storage | None = None,
    workers: int | None = None,
) -> Collection:
    """Every cell under ``uri``, read in parallel; the expected grid from ``study`` if given."""
    store = open_store(uri, storage)
    import_for_threads(uri, storage)  # Rule: no module is first imported inside a thread or pool.
    if workers is None:
        # The S3 client keeps 2 × max_concurrency connections: use them all, no more.
        workers = 2 * storage.max_concurrency if storage is not None else MAX_WORKERS
    if study is not None:
        return _collect_with_spec(store, study, workers)
    return _collect_inferred(store, workers)


# --------------------------------------------------------------------------------------------
# Expected cells
# --------------------------------------------------------------------------------------------


def _collect_with_spec(store: Store, study: Study, workers: int) -> Collection:
    from service.spec.study import effective, expand

    cells = expand(study)
    datasets = [d.short_name for d in study.datasets]
    domains = {d.short_name: d.domain for d in study.datasets}
    # The prefix is either the study's output.uri (cells under <study>/...) or the study
    # folder itself; try the likelier first, judged by the URI's last component.
    at_study = store.uri.rstrip("/").rsplit("/", 1)[-1] == study.name
    bases = ["", f"{study.name}/"] if at_study else [f"{study.name}/", ""]
    files: dict[str, set[str]] = {}
    base = bases[0]
    for base in bases:
        listings = _parallel(lambda d, b=base: store.list(f"{b}{d}/"), datasets, workers)
        files = _group(itertools.chain.from_iterable(listings))
        if files:
            break
    expected: list[Cell] = []
    for ft in cells:
        key = base + ft.run_id.split("/", 1)[1]
        expected.append(
            Cell(
                key=key,
                dataset=ft.dataset.short_name,
                backbone=ft.backbone.model,
                seed=ft.protocol.seed,
                fraction=ft.dataset.train_fraction,
                domain=domains[ft.dataset.short_name],
                spec_hash=ft.spec_hash,
                protocol=effective(ft.protocol),
            )
        )
    notes = []
    if study.search.strategy == "successive_halving":
        expected, note = _search_survivors(store, study, expected)
        notes += [note] if note else []
    extra = sorted(set(files) - {c.key for c in expected})
    if extra:
        notes.append(
            f"{len(extra)} run folder(s) under the prefix are not cells of the spec and were "
            f"ignored (e.g. {extra[0]})"
        )
    _read_cells(store, expected, files, workers)
    return Collection(
        uri=store.uri,
        study=study.name,
        cells=expected,
        grid="spec",
        notes=notes,
        dataset_order=datasets,
        backbone_order=_unique(b.model for b in study.backbones),
    )


def _search_survivors(store: Store, study: Study, expected: list[Cell]):
    """A search expects the cells of its latest rung's candidates only: the others were
    stopped on purpose (the report's Selection section says why)."""
    from service.report.search_state import read_state, survivors

    state, _ = read_state(store, study.name)
    if state is None:
        return expected, "search: no _search/state.json yet; every cell of the grid expected"
    keep = survivors(state)
    kept = [c for c in expected if c.backbone in keep.get(f"{c.dataset}/frac{c.fraction}", [])]
    return kept, (
        f"search: {len(expected) - len(kept)} cells of backbones not promoted to the "
        "latest rung are not expected (see Selection)"
    )


def _inferred_search_survivors(store: Store, study: str, cells: list[Cell]):
    """Without a spec, as with one: a search's candidates stopped at a rung are not cells the
    study still owes (they never resume), so they are neither expected nor 'not finished'."""
    from service.report.search_state import read_state, survivors

    state, _ = read_state(store, study or None)
    if state is None:
        return cells, None
    keep = survivors(state)
    kept = [c for c in cells if c.backbone in keep.get(f"{c.dataset}/frac{c.fraction}", [])]
    return kept, (
        f"search: {len(cells) - len(kept)} cells of candidates stopped at a rung are final "
        "(they do not resume) and are not expected (see Selection)"
    )


def _collect_inferred(store: Store, workers: int) -> Collection:
    keys = store.list("")
    files = _group(keys)
    if not files:
        return _collect_plain_runs(store, keys, workers)
    parsed = {d: _CELL_FILE.match(f"{d}/{SPEC}") for d in files}
    studies = sorted({m["study"] or "" for m in parsed.values()})
    if len(studies) > 1:
        raise UserError(
            f"{store.uri}: holds several studies ({', '.join(s or '.' for s in studies)}); "
            f"report one at a time, e.g. {store.uri.rstrip('/')}/{studies[-1]}"
        )
    prefix = f"{studies[0]}/" if studies[0] else ""
    found = {
        d: Cell(
            key=d,
            dataset=m["dataset"],
            backbone=m["backbone"],
            seed=int(m["seed"]),
            fraction=float(m["frac"]),
        )
        for d, m in parsed.items()
    }
    _read_cells(store, list(found.values()), files, workers)
    datasets = sorted({c.dataset for c in found.values()})
    backbones = sorted({c.backbone for c in found.values()})
    seeds = sorted({c.seed for c in found.values()})
    fractions = sorted({c.fraction for c in found.values()})
    domains = {c.dataset: c.domain for c in found.values() if c.domain}
    by_coords = {(c.dataset, c.backbone, c.fraction, c.seed): c for c in found.values()}
    cells = []
    # Same order as expand(): dataset, backbone, fraction, seed.
    for ds, bb, fr, seed in itertools.product(datasets, backbones, fractions, seeds):
        cell = by_coords.get((ds, bb, fr, seed))
        if cell is None:
            key = prefix + run_id_for("x", ds, bb, seed, fr).split("/", 1)[1]
            cell = Cell(key=key, dataset=ds, backbone=bb, seed=seed, fraction=fr)
        cell.domain = cell.domain or domains.get(ds)
        cells.append(cell)
    notes = [
        "no study spec given: the expected grid is every dataset × backbone × seed × fraction "
        "seen under the prefix (pass --spec STUDY.json for the exact list)"
    ]
    cells, note = _inferred_search_survivors(store, studies[0], cells)
    notes += [note] if note else []
    return Collection(
        uri=store.uri,
        study=studies[0] or _study_from_summaries(cells),
        cells=cells,
        grid="inferred",
        notes=notes,
        dataset_order=datasets,
        backbone_order=backbones,
    )


_RUN_FILE = re.compile(r"^(?P<dir>(?:.+/)?[^/]+)/(?P<file>summary|status|spec)\.json$")


def _collect_plain_runs(store: Store, keys: list[str], workers: int) -> Collection:
    """FineTune outputs with no study layout: a leaderboard of whatever runs are there."""
    files: dict[str, set[str]] = {}
    for key in keys:
        m = _RUN_FILE.match(key)
        if m and "/checkpoints" not in m["dir"]:
            files.setdefault(m["dir"], set()).add(f"{m['file']}.json")
    if not files:
        raise UserError(
            f"{store.uri}: no runs found (no summary.json, status.json or spec.json below it)"
        )
    cells = [Cell(key=d, dataset="?", backbone=d, seed=0, fraction=1.0) for d in sorted(files)]
    _read_cells(store, cells, files, workers)

    def place(cell: Cell) -> None:
        """Coordinates from the summary, else from the spec the run wrote at its start."""
        if cell.summary is not None:
            s = cell.summary
            ds, bb, seed, frac = s.dataset, s.backbone, s.seed, s.train_fraction
        else:
            try:
                spec = _read_json(store, f"{cell.key}/{SPEC}") or {}
            except ValueError:
                spec = {}
            dataset = spec.get("dataset") or {}
            ds = dataset.get("name") or _short_dataset(dataset.get("uri"))
            bb = (spec.get("backbone") or {}).get("model")
            seed = (spec.get("protocol") or {}).get("seed")
            frac = (spec.get("dataset") or {}).get("train_fraction")
        cell.dataset = ds or "?"
        cell.backbone = bb or cell.key
        cell.seed = int(seed or 0)
        cell.fraction = float(frac if frac is not None else 1.0)

    _parallel(place, cells, workers)
    # Two runs of one backbone on one dataset and seed (another recipe, say) stay apart.
    coords: dict[tuple, list[Cell]] = {}
    for c in cells:
        coords.setdefault((c.dataset, c.backbone, c.seed, c.fraction), []).append(c)
    for same in coords.values():
        if len(same) > 1:
            for c in same:
                c.backbone = f"{c.backbone} ({c.key})"
    return Collection(
        uri=store.uri,
        study=None,
        cells=cells,
        grid="inferred",
        notes=[f"no study layout: {len(cells)} FineTune runs compared as they are"],
        dataset_order=_unique(sorted(c.dataset for c in cells)),
        backbone_order=_unique(sorted(c.backbone for c in cells)),
    )


def _short_dataset(uri: str | None) -> str | None:
    if not uri:
        return None
    from service.spec import dataset_name_from_uri

    return dataset_name_from_uri(uri)


def _study_from_summaries(cells: list[Cell]) -> str | None:
    return next((c.summary.study for c in cells if c.summary), None)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _group(keys: Iterable[str]) -> dict[str, set[str]]:
    """Cell folder -> the JSON files it holds."""
    out: dict[str, set[str]] = {}
    for key in keys:
        if _SEARCH_DIR.search(key):
            continue  # a search's state and shortened rungs: not cells of the study
        m = _CELL_FILE.match(key)
        if m:
            out.setdefault(m["dir"], set()).add(f"{m['file']}.json")
    return out


def _read_cells(store: Store, cells: list[Cell], files: dict[str, set[str]], workers: int) -> None:
    def read(cell: Cell) -> None:
        _read_cell(store, cell, files.get(cell.key, set()))

    _parallel(read, cells, workers)


def _read_cell(store: Store, cell: Cell, present: set[str]) -> None:
    if not present:
        cell.state, cell.reason = "missing", "no output"
        return
    if SUMMARY in present:
        try:
            summary = _read_json(store, f"{cell.key}/{SUMMARY}")
        except ValueError as e:
            cell.state, cell.reason = "unreadable", f"summary.json: {e}"
            return
        try:
            summary = _summary(summary)
        except UnreadableOutput as e:
            cell.state, cell.reason = "unreadable", str(e)
            return
        found = summary.spec_hash if summary is not None else None
        if summary is not None and cell.spec_hash and found and found != cell.spec_hash:
            # Trained under another protocol (the spec changed since): not comparable.
            cell.state = "stale"
            cell.reason = (
                f"summary.json is from another spec (spec_hash {found}, the study expects "
                f"{cell.spec_hash}); re-run the cell"
            )
            return
        if summary is not None:
            cell.state, cell.reason, cell.summary = "done", None, summary
            cell.domain = summary.domain or cell.domain
            return
    status = None
    if STATUS in present:
        try:
            status = _read_json(store, f"{cell.key}/{STATUS}")
            status = None if status is None else RunStatus.read(status, STATUS)
        except ValueError as e:
            cell.state, cell.reason = "unreadable", f"status.json: {e}"
            return
        except UnreadableOutput as e:
            cell.state, cell.reason = "unreadable", str(e)
            return
    cell.status = status
    cell.state, cell.reason = _status_reason(status)


def _read_json(store: Store, key: str) -> dict | None:
    try:
        data = json.loads(store.read_bytes(key))
    except NotFound:
        return None  # deleted between listing and reading
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _summary(data: dict | None) -> RunSummary | None:
    """summary.json read through its contract (service.outputs.contract): the version first, then
    the report's own rule (a numeric test.top1), then every field's type."""
    if data is None:
        return None
    check_version(data, SUMMARY)
    if problem := _check_summary(data):
        raise UnreadableOutput(f"{SUMMARY}: {problem}")
    return RunSummary.read(data, SUMMARY)


def _check_summary(summary: dict | None) -> str | None:
    if summary is None:
        return None
    test = summary.get("test")
    top1 = test.get("top1") if isinstance(test, dict) else None
    if not isinstance(top1, int | float) or isinstance(top1, bool):
        return "has no numeric test.top1"
    if not 0 <= top1 <= 1:
        return f"test.top1 must be a fraction in [0, 1], got {top1}"
    return None


def _status_reason(status: RunStatus | None) -> tuple[State, str]:
    if status is None:
        return "incomplete", "no summary.json and no status.json (never started?)"
    phase = status.phase
    if phase == "Failed":
        error = status.error or "no error recorded"
        attempt = status.attempt
        tail = f" (attempt {attempt})" if attempt and attempt > 1 else ""
        return "failed", f"failed: {error}{tail}"
    if phase == "Succeeded":
        return "incomplete", "status says Succeeded but summary.json is missing"
    epoch, cap = status.epoch, status.max_epochs
    where = f", epoch {epoch}/{cap}" if epoch is not None and cap else ""
    # A retriable stop (preempted, storage down) is Pending with its error: say why it waits.
    why = f"; stopped: {status.error}" if status.error else ""
    return "incomplete", f"not finished: phase {phase}{where}{why}"


def _parallel(fn: Callable, items: list, workers: int) -> list:
    if len(items) <= 1 or workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))

"""One owner for "what a result depends on": fields say so themselves (``Annotated[T, HOW]``
for how or where a run computes), and every hash of a spec is ``digest.json_hash`` of
``spec.result.result_view``: a FineTune's and a Study's ``spec_hash``, the Job's spec-hash
annotation, every cell's hash, and a search's fingerprint."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

from service.k8s.render import SPEC_HASH, render_job
from service.search.driver import Driver, _fingerprint_before_0_2, fingerprint, read_state
from service.spec import parse_spec
from service.spec.result import HOW
from service.spec.study import expand
from tests import specs
from tests.test_search_driver import FakeRunner, search_doc

REPO = Path(__file__).resolve().parent.parent

# Computed with the code before the hashes had one owner (commit 30efa25): runs, Jobs and
# searches made by earlier releases must still resume, report and compare as "the same".
PINNED = {
    "cluster-ddp.json": ("854176bac0b56fc0", None),
    "cluster-study.json": ("47f31226d8d7e852", "c563538b7ca17a53"),
    "eurosat-convnext.json": ("a83a969d8a7566f1", None),
    "medical-lowdata.json": ("8ccf30bbcff3c8e6", None),
    "paper-study-faithful.json": ("747734faf09843f3", "a6937b6784c5420d"),
    "paper-study.json": ("353dc4182a278eb2", "ab8d9453de1414bd"),
    "quickstart.json": ("04587c0c70c06d3c", None),
    "search-quickstart.json": ("798d1affeac34ff1", "eef663520fe65404"),
}


def _load(name: str):
    return parse_spec(json.loads((REPO / "jobspecs" / name).read_text()))


@pytest.mark.parametrize("name", sorted(PINNED))
def test_every_jobspec_keeps_the_hashes_earlier_releases_wrote(name):
    spec = _load(name)
    cells = [c.spec_hash for c in expand(spec)] if spec.kind == "Study" else []
    of_cells = hashlib.sha256(" ".join(cells).encode()).hexdigest()[:16] if cells else None
    assert (spec.spec_hash, of_cells) == PINNED[name]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_job_carries_the_specs_own_hash(name):
    spec = _load(name)
    job = render_job(spec, image="backbones:0.1.0")
    assert job["metadata"]["annotations"][SPEC_HASH] == spec.spec_hash


def _with_micro_batch(doc: dict, value) -> dict:
    return specs.merge(
        doc,
        {"protocol": {"micro_batch": value}},
        {"datasets": [{**d, "protocol": {"micro_batch": value}} for d in doc["datasets"]]},
    )


def test_the_micro_batch_remedy_changes_no_hash_and_orphans_no_search(tmp_path):
    """Halving micro_batch after an out-of-memory error is how a batch is computed, not what:
    the cells, the Job and the search must all still be "the same" (the search's fingerprint
    hashed it before, so the search refused to resume)."""
    doc = search_doc(tmp_path, "restart")
    before, after = parse_spec(doc), parse_spec(_with_micro_batch(doc, 8))
    assert before.spec_hash == after.spec_hash
    assert [c.spec_hash for c in expand(before)] == [c.spec_hash for c in expand(after)]
    assert fingerprint(before) == fingerprint(after)

    Driver(before, FakeRunner(), echo=lambda m: None).run()
    state = Driver(after, FakeRunner(), echo=lambda m: None).run()
    assert state["phase"] == "done"


def test_what_changes_a_result_changes_every_hash(tmp_path):
    doc = search_doc(tmp_path, "restart")
    a, b = parse_spec(doc), parse_spec(specs.merge(doc, {"protocol": {"lr": 0.01}}))
    assert a.spec_hash != b.spec_hash
    assert fingerprint(a) != fingerprint(b)
    assert expand(a)[0].spec_hash != expand(b)[0].spec_hash
    # The search plan decides which cells train, so it is in the fingerprint (not the hash).
    c = parse_spec(specs.merge(doc, {"search": {"eta": 2}}))
    assert (a.spec_hash, fingerprint(a) != fingerprint(c)) == (c.spec_hash, True)


def test_a_search_started_by_an_earlier_release_resumes(tmp_path):
    s = parse_spec(search_doc(tmp_path, "restart"))
    Driver(s, FakeRunner(crash_after=None), echo=lambda m: None).run()
    store_state = read_state(s)
    store_state["fingerprint"] = _fingerprint_before_0_2(s)  # what 0.1 wrote
    from service.search.driver import STATE, search_store

    search_store(s).write_bytes(STATE, json.dumps(store_state).encode())
    state = Driver(s, FakeRunner(), echo=lambda m: None).run()
    assert state["fingerprint"] == fingerprint(s)


def test_where_and_how_a_run_computes_is_declared_on_the_fields():
    """The list a reviewer checks when a field is added: everything else is in the hash."""
    from service.spec import FineTune, Protocol, Study

    def marked(model) -> set[str]:
        return {n for n, f in model.model_fields.items() if HOW in f.metadata}

    assert marked(FineTune) == {
        "schema_", "api_version", "kind", "output", "resources", "storage", "metrics"
    }  # fmt: skip
    assert marked(Study) == marked(FineTune) | {"max_gpu_hours", "search"}
    assert marked(Protocol) == {"micro_batch"}


def test_no_module_hashes_json_by_hand():
    """digest.json_hash is the one canonical JSON hash (sorted keys, default separators)."""
    offenders = []
    for path in (REPO / "service").rglob("*.py"):
        if path.name == "digest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and ast.unparse(node.func).endswith("sha256")
            if call and "json.dumps" in ast.unparse(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []

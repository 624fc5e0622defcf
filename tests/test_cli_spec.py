"""`backbones validate`, `expand` and `schema` through typer's runner: what a user sees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.backbones import names
from service.cli import _app, app
from service.cli.spec_cmds import schemas
from service.spec import load_spec
from service.spec.study import expand
from tests import specs

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "jobspecs" / "quickstart.json")
PAPER = str(REPO / "jobspecs" / "paper-study.json")

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug_leak():
    """--debug sets process-wide state; keep it from leaking between tests."""
    before = dict(_app._state)
    yield
    _app._state.clear()
    _app._state.update(before)


def write(tmp_path: Path, name: str, doc) -> str:
    path = tmp_path / name
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return str(path)


def finetune(**patch) -> dict:
    """``tests.specs.finetune`` named ``run``; ``protocol__batch_size=0`` sets one field."""
    layer: dict = {}
    for dotted, value in patch.items():
        section, key = dotted.split("__")
        layer.setdefault(section, {})[key] = value
    return specs.finetune({"name": "run"}, layer)


def validate(*args: str):
    return runner.invoke(app, ["validate", *args])


# ---- validate: the ok lines --------------------------------------------------------------------


def test_validate_prints_ok_with_kind_and_name_for_a_finetune():
    result = validate(QUICKSTART)
    assert result.exit_code == 0
    assert result.stdout == f"ok: {QUICKSTART} (FineTune quickstart)\n"


def test_validate_prints_the_cell_count_of_a_study():
    result = validate(PAPER)
    assert result.exit_code == 0
    n = len(expand(load_spec(PAPER)))
    first, *notes = result.stdout.splitlines()
    assert first.startswith(f"ok: {PAPER} (Study paper, {n} cells") and first.endswith(")")
    # the Job's deadline (capped), then the backbones without a shipped size rule
    # (torchvision's, WaveMix) point to --deep
    assert notes[0].startswith("  deadline: activeDeadlineSeconds 604800 (7.0 days")
    assert notes[1:] == [
        "  image sizes not checked for shufflenet_v2_x2_0, wavemix (no shipped size rule): "
        "`backbones validate --deep` builds each pair to check it"
    ]


def test_validate_checks_every_file_and_exits_2_if_any_is_invalid(tmp_path):
    bad = write(tmp_path, "bad.json", finetune(protocol__batch_size=-4))
    result = validate(QUICKSTART, bad)
    assert result.exit_code == 2
    assert result.stdout == f"ok: {QUICKSTART} (FineTune quickstart)\n"
    assert result.stderr == f"{bad}: protocol.batch_size: must be > 0, got -4\n"


# ---- validate: one line per problem, no traceback -----------------------------------------------


def test_each_problem_is_one_line_naming_file_and_field(tmp_path):
    bad = write(tmp_path, "bad.json", finetune(protocol__batch_size=-4, resources__gpus=-1))
    result = validate(bad)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{bad}: protocol.batch_size: must be > 0, got -4",
        f"{bad}: resources.gpus: must be >= 0, got -1",
    ]


def test_unknown_key_gets_did_you_mean(tmp_path):
    bad = write(tmp_path, "typo.json", finetune(protocol__batchsize=64))
    assert validate(bad).stderr == (
        f"{bad}: protocol.batchsize: unknown field; did you mean 'protocol.batch_size'?\n"
    )


def test_backbone_name_close_to_a_catalog_name_gets_did_you_mean(tmp_path):
    doc = finetune()
    doc["backbone"]["model"] = "convnext_tiy"
    bad = write(tmp_path, "model.json", doc)
    result = validate(bad)
    assert result.exit_code == 2
    assert result.stderr == (
        f"{bad}: backbone.model: unknown model 'convnext_tiy'; did you mean 'convnext_tiny'?\n"
    )


def test_study_backbone_problems_name_the_list_index(tmp_path):
    doc = specs.study(name="s", backbones=[{"model": "resnet50"}, {"model": "regnety_32"}])
    bad = write(tmp_path, "study.json", doc)
    assert validate(bad).stderr == (
        f"{bad}: backbones.1.model: unknown model 'regnety_32'; did you mean 'regnety_032'?\n"
    )


def test_an_unavailable_catalog_backbone_is_refused_with_the_reason(tmp_path, monkeypatch):
    import dataclasses

    from service.backbones import catalog

    real = catalog.get
    gone = dataclasses.replace(real("test_resnet"), available=False, note="no builder ships")
    monkeypatch.setattr(catalog, "get", lambda n: gone if n == "test_resnet" else real(n))
    result = validate(write(tmp_path, "w.json", finetune()))
    assert result.exit_code == 2
    assert "backbone.model: 'test_resnet' is not available: no builder ships" in result.stderr


def test_malformed_json_reports_line_and_column(tmp_path):
    bad = write(tmp_path, "broken.json", '{\n  "kind": "FineTune",\n  "name": "x",\n}\n')
    result = validate(bad)
    assert result.exit_code == 2
    assert result.stderr == (
        f"{bad}: line 4, column 1: malformed JSON: Expecting property name enclosed in double "
        "quotes\n"
    )


def test_a_missing_file_is_one_line_not_a_traceback(tmp_path):
    missing = str(tmp_path / "nope.json")
    result = validate(missing)
    assert result.exit_code == 2
    assert result.stderr == f"{missing}: No such file or directory\n"


def test_a_binary_file_is_one_line(tmp_path):
    bad = write(tmp_path, "bin.json", b"\xff\xfe{}")
    assert validate(bad).stderr == f"{bad}: not UTF-8 text (byte 0xff at offset 0)\n"


# Every command that takes a spec file, not only validate: the same one line and exit 2.
SPEC_COMMANDS = [
    ["run"], ["worker", "--spec"], ["expand"], ["render"], ["submit"], ["budget"],
    ["report", "nowhere", "--spec"],
]  # fmt: skip


@pytest.mark.parametrize("command", SPEC_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("what", ["missing", "folder", "binary"])
def test_every_spec_command_refuses_an_unreadable_spec_file_in_one_line(tmp_path, command, what):
    path = {
        "missing": tmp_path / "nope.json",
        "folder": tmp_path,
        "binary": Path(write(tmp_path, "bin.json", b"\xff\xfe{}")),
    }[what]
    result = runner.invoke(app, [*command, str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    why = {
        "missing": "No such file or directory",
        "folder": "Is a directory",
        "binary": "not UTF-8 text (byte 0xff at offset 0)",
    }[what]
    (line,) = result.stderr.splitlines()
    assert line.removeprefix("error: ") == f"{path}: {why}"


@pytest.mark.parametrize(
    "text",
    ["", "[]", "null", '"spec"', "{", '{"kind": 3}', b"\xff\xfe{}", '{"kind": "Study"}'],
)
def test_no_traceback_for_any_bad_input(tmp_path, text):
    result = validate(write(tmp_path, "x.json", text))
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback_that_is_hidden_otherwise(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    quiet = runner.invoke(app, ["schema", "--out", str(blocker)])
    assert quiet.exit_code == 2 and quiet.stderr.startswith("error: ")
    assert isinstance(quiet.exception, SystemExit)
    loud = runner.invoke(app, ["--debug", "schema", "--out", str(blocker)])
    assert isinstance(loud.exception, FileExistsError)


# ---- validate: fast and torch-free; --deep asks timm --------------------------------------------


def test_validate_imports_neither_torch_nor_timm():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from service.cli import app\n"
        f"r = CliRunner().invoke(app, ['validate', {QUICKSTART!r}, {PAPER!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'boto3') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_deep_checks_names_against_timm_itself(tmp_path, monkeypatch):
    """Shallow validate reads a shipped name list; --deep asks timm's registry."""
    doc = finetune()
    doc["backbone"]["model"] = "resnet18"  # in timm, not in the catalog
    spec = write(tmp_path, "r18.json", doc)
    monkeypatch.setattr(names, "timm_names", lambda: frozenset())  # a stale shipped list
    assert validate(spec).exit_code == 2
    assert validate("--deep", spec).exit_code == 0


def test_deep_refuses_a_name_timm_does_not_know(tmp_path):
    doc = finetune()
    doc["backbone"]["model"] = "resnet_5O"
    bad = write(tmp_path, "bad.json", doc)
    result = validate("--deep", bad)
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"{bad}: backbone.model: unknown model 'resnet_5O'; did you mean 'resnet50'?\n"
    )


# ---- expand and schema --------------------------------------------------------------------------


def test_expand_prints_one_json_line_per_cell_in_execution_order():
    result = runner.invoke(app, ["expand", PAPER])
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    cells = expand(load_spec(PAPER))
    assert [line["index"] for line in lines] == list(range(len(cells)))
    assert [line["run_id"] for line in lines] == [c.run_id for c in cells]
    assert lines[0]["run_id"] == "paper/cifar10/resnet50/seed0-frac1.0"
    assert lines[0]["spec"]["kind"] == "FineTune" and lines[0]["spec"]["study"] == "paper"


def test_expand_of_a_finetune_is_the_run_itself():
    lines = runner.invoke(app, ["expand", QUICKSTART]).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run_id"] == "quickstart"


def test_expand_of_an_invalid_spec_prints_its_problems_and_exits_2(tmp_path):
    bad = write(tmp_path, "bad.json", finetune(protocol__batch_size=0))
    result = runner.invoke(app, ["expand", bad])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"{bad}: protocol.batch_size: must be > 0, got 0\n"


def test_schema_writes_both_kinds(tmp_path):
    result = runner.invoke(app, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0
    assert len(schemas()) == 2
    for fname, body in schemas().items():
        assert json.loads((tmp_path / fname).read_text()) == body
        assert f"wrote {tmp_path / fname}" in result.stdout

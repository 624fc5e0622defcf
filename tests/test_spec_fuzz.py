"""Bad specs, generated (issue 8 point 4): `validate` never crashes, never prints a traceback,
exits 0 or 2, and every problem line names a field (or the line and column of broken JSON).

Over 1,000 specs in all: mutations of the valid examples (wrong types, out-of-range numbers,
unknown and misspelt keys, deleted required keys), random JSON including non-objects, and
malformed JSON text. The bulk goes through ``loads_spec``/``parse_spec`` + ``check_models`` (what
`validate` calls); a sample goes through the command itself.
"""

import copy
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from service.backbones.checks import check_models
from service.cli import app
from service.spec import KINDS, SpecError, loads_spec, parse_spec

JOBSPECS = Path(__file__).resolve().parent.parent / "jobspecs"
BASES = [json.loads(p.read_text()) for p in sorted(JOBSPECS.glob("*.json"))]

# A field path: dotted keys and list indices; odd keys are JSON-quoted.
FIELD = re.compile(
    r'^(?:[A-Za-z0-9_$-]+|"(?:[^"\\]|\\.)*")(?:\.(?:[A-Za-z0-9_$-]+|"(?:[^"\\]|\\.)*"))*$'
)
DOCUMENT_LEVEL = (
    re.compile(r"^line \d+, column \d+: malformed JSON: "),
    re.compile(r"^a spec must be a JSON object, got \w+$"),
    re.compile(r"^malformed spec: JSON nested too deeply$"),
)
TOP_KEYS = {f.alias or n for model in KINDS.values() for n, f in model.model_fields.items()}

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same specs on every run: CI stays deterministic
    database=None,  # and nothing written to .hypothesis/
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [0, -1, -4, 1.5, 2**63, -(2**70), 1e308, "", "s3://", "timm", "none", "builtin://x"]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every (path, value) in a document, the root included."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _typo(word: str, data) -> str:
    if not word:
        return "x"
    i = data.draw(st.integers(0, len(word) - 1))
    edit = data.draw(st.sampled_from(["drop", "double", "swap", "upper", "dash"]))
    if edit == "drop":
        return word[:i] + word[i + 1 :] or "x"
    if edit == "double":
        return word[:i] + word[i] + word[i:]
    if edit == "swap" and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if edit == "upper":
        return word.upper()
    return word.replace("_", "-") if "_" in word else word + "_"


def _mutate(doc, data):
    """One random mutation of a document; returns the new document (the root may be replaced)."""
    path, node = data.draw(st.sampled_from(list(_paths(doc))))
    op = data.draw(st.sampled_from(["replace", "delete", "unknown_key", "rename_key"]))
    if op == "replace" or (not path and not isinstance(node, dict)):
        new = data.draw(json_values)
        if not path:
            return new
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = new
        return doc
    if op == "delete" and path:
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        del parent[path[-1]]
        return doc
    if isinstance(node, dict):
        keys = list(node)
        if op == "rename_key" and keys:
            key = data.draw(st.sampled_from(keys))
            node[_typo(str(key), data)] = node.pop(key)
        else:
            base = data.draw(st.sampled_from(keys)) if keys else "key"
            name = data.draw(st.sampled_from([_typo(str(base), data), "zzz", "a\nb", "x.y"]))
            node[name] = data.draw(json_values)
    return doc


def _check(parse) -> list[tuple[str, str]]:
    """Run what `validate` runs; only SpecError may come out. Returns the problems."""
    try:
        spec = parse()
    except SpecError as e:
        problems = e.problems
        assert problems, "a SpecError without problems"
    else:
        problems = check_models(spec)
    for loc, msg in problems:
        assert "\n" not in loc and "\n" not in msg, (loc, msg)
        assert msg, loc
        if loc:
            assert FIELD.match(loc), loc
        else:
            assert any(p.match(msg) for p in DOCUMENT_LEVEL), msg
    return problems


def _names_a_field_of(doc, problems):
    """Each field path starts at a key the document has or the spec defines."""
    for loc, _ in problems:  # may not run: a mutation may leave the document valid
        if loc:
            first = (
                json.JSONDecoder().raw_decode(loc)[0] if loc.startswith('"') else loc.split(".")[0]
            )
            assert first in TOP_KEYS or (isinstance(doc, dict) and first in doc), loc


@FUZZ
@given(st.data())
def test_mutated_specs_fail_only_with_field_named_problems(data):
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    for _ in range(data.draw(st.integers(1, 3))):
        doc = _mutate(doc, data)
    _names_a_field_of(doc, _check(lambda: parse_spec(doc)))


@FUZZ
@given(st.data())
def test_mutated_specs_through_json_text(data):
    """The same through the text path (NaN and Infinity survive json.dumps as bare words)."""
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    doc = _mutate(doc, data)
    text = json.dumps(doc)
    _names_a_field_of(doc, _check(lambda: loads_spec(text)))


@settings(FUZZ, max_examples=200)
@given(json_values)
def test_random_json_documents_are_refused_cleanly(doc):
    _check(lambda: parse_spec(doc))


@settings(FUZZ, max_examples=200)
@given(st.data())
def test_malformed_json_text_reports_line_and_column(data):
    text = json.dumps(data.draw(st.sampled_from(BASES)), indent=2)
    cut = data.draw(st.integers(0, len(text) - 1))
    junk = data.draw(st.sampled_from(["", ",", "}", "{", '"', "\\", "]", "\x00", "NaN", "//"]))
    broken = text[:cut] + junk + text[cut + data.draw(st.integers(0, 3)) :]
    _check(lambda: loads_spec(broken))


_runner = CliRunner()
_LINE = re.compile(r"^(?P<file>[^:]+): (?P<rest>.*)$")


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_validate_command_exits_0_or_2_without_a_traceback(data):
    kind = data.draw(st.sampled_from(["mutated", "random", "malformed"]))
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    if kind == "mutated":
        text = json.dumps(_mutate(doc, data))
    elif kind == "random":
        text = json.dumps(data.draw(json_values))
    else:
        text = json.dumps(doc)[: data.draw(st.integers(0, 200))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(text)
        result = _runner.invoke(app, ["validate", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 2)
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        assert result.stdout.startswith(f"ok: {path} (")
        return
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        m = _LINE.match(line)
        assert m and m["file"] == str(path), line
        loc = m["rest"].partition(": ")[0]
        assert FIELD.match(loc) or any(p.match(m["rest"]) for p in DOCUMENT_LEVEL), line

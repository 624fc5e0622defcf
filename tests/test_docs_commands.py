"""The docs are tested: every `backbones` command in README.md and docs/*.md that can run here
is run, with temporary paths put in for the placeholders, and its output is compared where the
docs show it. Commands that need a cluster are listed with the reason, so a new command in the
docs must be either runnable here or named below.

Placeholders the docs use and what stands in for them:
  my-spec.json, spec.json        -> jobspecs/quickstart.json
  study.json                     -> jobspecs/cluster-study.json
  REG/... or "$IMAGE" images     -> a digest-pinned image reference
  ./runs                         -> a synthetic study output (tests/reportutil.py)
  ./images, ./digits             -> small image folders (tests/data_factory.py)
  ./convnext_tiny.safetensors,
  ./test_resnet.pth              -> weights of a freshly built test_resnet
  s3://<bucket>/...              -> a bucket of the real SeaweedFS fixture
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.faults import backbones
from tests.trainutil import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
IMAGE = "registry.example.com/ml/backbones@sha256:" + "0" * 64

# Sub-commands that talk to a Kubernetes API server: no cluster runs here. Their API calls are
# tested against a fake API object (tests/test_k8s_client.py, tests/test_k8s_status.py).
NEEDS_CLUSTER = {"submit", "status", "logs", "cancel"}


def why_not_here(cmd: Command) -> str | None:
    """Why a command of the docs cannot run on this machine, or None when it can."""
    if cmd.sub in NEEDS_CLUSTER:
        return "needs a Kubernetes API server"
    if cmd.sub == "weights push" and not Path(cmd.words[-2]).suffix:
        return "fetches ImageNet weights from the Hugging Face hub (no internet here)"
    return None


@dataclass
class Command:
    doc: str  # file name, for test ids and messages
    line: int
    text: str  # the command as the docs show it
    shown: list[str]  # output lines the docs show after it (console blocks), if any

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def sub(self) -> str:
        w = [x for x in self.words[1:] if not x.startswith("-")]
        return " ".join(w[:2]) if w[:1] in (["dataset"], ["weights"]) else (w[0] if w else "")

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    # Docs put comments after two spaces and a '#'; a '#' inside a word is not a comment.
    return re.split(r"\s{2,}#|^\s*#", line, maxsplit=1)[0].rstrip()


def commands() -> list[Command]:
    out: list[Command] = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
            start = text[: block.start()].count("\n") + 2
            lines = block.group(1).splitlines()
            console = any(line.startswith("$ ") for line in lines)
            i = 0
            while i < len(lines):
                raw = lines[i]
                body = raw[2:] if console and raw.startswith("$ ") else raw
                if console and not raw.startswith("$ "):
                    i += 1
                    continue
                # `pip install ... && backbones run ...`: the backbones part is the command.
                cmd = _strip_comment(body.split("&& ")[-1] if "&& backbones" in body else body)
                shown = []
                j = i + 1
                while console and j < len(lines) and not lines[j].startswith("$ "):
                    shown.append(lines[j])
                    j += 1
                if cmd.startswith("backbones ") and "|" not in cmd.split("#")[0]:
                    out.append(Command(path.name, start + i, cmd, shown))
                elif re.match(r"backbones \S.*\|", cmd):
                    out.append(Command(path.name, start + i, cmd.split("|")[0].strip(), shown))
                i = j if console else i + 1
    return out


ALL = commands()
RUNNABLE = [c for c in ALL if why_not_here(c) is None]


def test_the_docs_show_backbones_commands_and_each_is_run_or_named_as_needing_a_cluster():
    assert len(ALL) >= 30, [str(c) for c in ALL]
    unknown = {c.sub for c in ALL} - NEEDS_CLUSTER - set(RUNS)
    assert not unknown, f"commands in the docs this test does not know how to run: {unknown}"


# -- placeholders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Stand-ins for what the docs call ./runs, ./images, spec files and weight files."""
    from tests.data_factory import digits_tree
    from tests.reportutil import summary, write_summary

    root = tmp_path_factory.mktemp("docs")
    for ds, domain in (("eurosat", "remote_sensing"), ("digits", "natural")):
        for i, (bb, gmacs) in enumerate(
            (("mobilenetv3_large_100", 0.22), ("efficientnet_b0", 0.39), ("resnet50", 4.1))
        ):
            for seed in (0, 1, 2):
                top1 = 0.8 + 0.03 * i + 0.01 * seed
                s = summary("st", ds, bb, seed, top1, domain=domain, gmacs=gmacs)
                write_summary(root / "runs", s)
    digits_tree(root / "images", n=60)
    digits_tree(root / "digits", n=60)
    (root / "jobspecs").symlink_to(REPO / "jobspecs")  # relative paths as in the docs
    import timm
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet", pretrained=False)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, root / "convnext_tiny.safetensors")
    torch.save(model.state_dict(), root / "test_resnet.pth")
    return root


def _substitute(cmd: Command, buckets: dict[str, str]) -> list[str]:
    words = []
    for w in cmd.words:
        if w in ("my-spec.json", "spec.json"):
            w = "jobspecs/quickstart.json"
        elif w == "study.json":
            w = "jobspecs/cluster-study.json"
        elif re.fullmatch(r"(\./)?runs[-\w]*/?", w):  # ./runs, runs-faithful/ ...
            w = "./runs"
        elif w.startswith("REG/") or w == "$IMAGE" or w.endswith(":0.1.0"):
            w = IMAGE
        elif w.startswith("s3://"):
            w = _in_bucket(w, buckets)
        if w.startswith("jobspecs/") and "*" in w:  # the shell's glob
            words += sorted(str(p.relative_to(REPO)) for p in REPO.glob(w))
            continue
        words.append(w)
    if words[1:2] == ["report"] and "--out" not in words:
        words += ["--out", "report/"]
    if words[1:2] == ["report"] and "--spec" in words:  # the docs' spec is a placeholder
        i = words.index("--spec")
        del words[i : i + 2]
    return words[1:]


def _in_bucket(text: str, buckets: dict[str, str]) -> str:
    """s3://<docs' bucket>/... -> the same key in the test server's bucket for it."""
    return re.sub(r"s3://([^/\s]+)", lambda m: f"s3://{buckets.get(m[1], m[1])}", text)


# What each sub-command needs besides the placeholders, and the exit code a docs example
# that shows an error expects (from its "error:" line).
RUNS = {
    "validate": "offline",
    "expand": "offline",
    "catalog": "offline",
    "render": "offline",
    "budget": "offline",
    "schema": "offline",
    "report": "offline",
    "recommend": "offline",
    "compare": "offline",
    "run": "offline",
    "search": "offline",
    "dataset push": "s3",
    "dataset inspect": "s3",
    "weights push": "s3",
}


def _mask(line: str) -> str:
    """Numbers, hashes and sizes vary with the data and the machine: compare the words."""
    line = re.sub(r"\b[0-9a-f]{6,}\b", "H", line)
    line = re.sub(r"\d[\d.,]*", "N", line)
    return re.sub(r"\s+", " ", line).strip()


@pytest.fixture(scope="module")
def buckets() -> dict[str, str]:
    """The docs' bucket names -> buckets of the test server, kept for the whole module, so a
    doc's `dataset inspect` finds what its `dataset push` put there."""
    return {}


@pytest.mark.parametrize("cmd", RUNNABLE, ids=[f"{c.doc}:{c.line}" for c in RUNNABLE])
def test_each_runnable_command_in_the_docs_works_as_shown(
    cmd, workspace, buckets, request, tmp_path
):
    needs = RUNS.get(cmd.sub)
    assert needs is not None, f"{cmd}: add its sub-command to RUNS or NEEDS_CLUSTER"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BACKBONES_CACHE": str(tmp_path / "cache")}
    if needs == "s3" or "s3://" in cmd.text:
        seaweed = request.getfixturevalue("seaweed")
        for name in re.findall(r"s3://([^/\s]+)", cmd.text):
            buckets.setdefault(f"{cmd.doc}:{name}", seaweed.make_bucket())
            buckets.setdefault(name, buckets[f"{cmd.doc}:{name}"])
        buckets.update(
            {n: buckets[f"{cmd.doc}:{n}"] for n in re.findall(r"s3://([^/\s]+)", cmd.text)}
        )
        env.update(seaweed.env())
        env["AWS_ENDPOINT_URL_S3"] = seaweed.endpoint
    args = _substitute(cmd, buckets)
    cwd = workspace
    if cmd.sub == "run":  # a run writes ./runs: keep it apart from the synthetic study
        cwd = tmp_path
        (cwd / "jobspecs").symlink_to(REPO / "jobspecs")
    r = subprocess.run(
        backbones(*args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = (r.stdout + r.stderr).splitlines()
    expects_error = any(line.startswith("error:") for line in cmd.shown)
    if expects_error:
        assert r.returncode == 2, f"{cmd}\n{r.stdout}{r.stderr}"
    else:
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    # Where the docs show output, the first line they show must appear (numbers masked).
    shown = [line for line in cmd.shown if line.strip() and not line.startswith("...")]
    if shown:
        want = _mask(_in_bucket(shown[0], buckets))
        got = {_mask(line) for line in output}
        assert want in got, f"{cmd}: docs show {shown[0]!r}; got {output[:5]}"

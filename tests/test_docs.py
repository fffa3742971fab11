"""Every code example in README.md and docs/*.md runs.

Blocks fenced as ```python run with this interpreter, ```bash and ```sh ones with bash
(-e, -o pipefail), each in a fresh process, in a scratch folder that holds a copy of
examples/ and links to the rest of the repository (so relative paths work and nothing
is written into the repository). A block must exit 0, or with the status a line
``<!-- doc-test: exit N -->`` right above it names. A block that cannot run here says
why right above it: ``<!-- doc-test: skip: REASON -->``. Other blocks (text, json,
yaml, none) are output or configuration, checked by the tests of what they show."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNERS = {"python": [sys.executable], "bash": ["bash", "-eo", "pipefail"], "sh": ["bash", "-eo", "pipefail"]}
MARKER = re.compile(r"<!-- doc-test: (skip: (?P<reason>.+?)|exit (?P<exit>\d+)) -->")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    lang: str
    code: str
    skip: str  # why it does not run, "" if it runs
    exit: int

    @property
    def id(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(fence.group(1)):])
            i += 1
        marker = MARKER.fullmatch(lines[start - 1].strip()) if start else None
        found.append(Block(path, start + 1, fence.group(2), "\n".join(body) + "\n",
                           marker.group("reason") or "" if marker else "",
                           int(marker.group("exit") or 0) if marker else 0))
        i += 1
    return found


ALL = [b for path in DOCS for b in blocks(path)]
RUNNABLE = [b for b in ALL if b.lang in RUNNERS and not b.skip]
RAN: set[str] = set()  # blocks run in the module's scratch folder


def test_the_docs_have_examples_and_each_skip_says_why() -> None:
    assert len(RUNNABLE) >= 7
    for b in ALL:
        assert not b.skip or len(b.skip) > 15, f"{b.id}: say why it cannot run"
    assert {b.lang for b in ALL} <= {*RUNNERS, "text", "json", "yaml", ""}, "a new kind of block: run it or list it"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder that looks like the repository root; examples/ is a copy (generate.py writes into it)."""
    folder = tmp_path_factory.mktemp("docs")
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") and entry.name not in (".ci",):
            continue
        if entry.name == "examples":
            shutil.copytree(entry, folder / entry.name)
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_example_runs(block: Block, scratch: Path) -> None:
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    # its own process group, so that a timeout ends whatever the example started
    proc = subprocess.Popen([*RUNNERS[block.lang], "-c", block.code], cwd=scratch, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{block.id} ran for more than 120 s")
    assert proc.returncode == block.exit, f"{block.id} exited {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    RAN.add(block.id)


def test_the_example_generator_reproduces_the_committed_cases(scratch: Path) -> None:
    """docs/gradcheck.md runs examples/gradcheck/generate.py in the scratch copy: same bytes as committed."""
    [generate] = [b for b in RUNNABLE if "examples/gradcheck/generate.py" in b.code]
    if generate.id not in RAN:
        test_example_runs(generate, scratch)
    committed = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / "examples").rglob("*") if p.is_file()}
    fresh = {p.relative_to(scratch): p.read_bytes() for p in (scratch / "examples").rglob("*") if p.is_file()}
    assert fresh == committed, f"stale examples: run {generate.code.strip().splitlines()[0]} and commit"


def test_compose_snippets_in_the_docs_match_docker_compose() -> None:
    """A yaml block that shows compose services shows what docker-compose.yml says."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    shown = 0
    for b in ALL:
        if b.lang != "yaml":
            continue
        snippet = yaml.safe_load(b.code)
        for name, service in (snippet.get("services", snippet) or {}).items():
            if name in compose and isinstance(service, dict):
                shown += 1
                for key in ("volumes", "ports", "command"):
                    for item in service.get(key, []):
                        assert item in compose[name].get(key, []), f"{b.id}: {name}.{key} {item!r} is not in compose"
    assert shown >= 1

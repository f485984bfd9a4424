"""Every code block of the README and of `docs/*.md` runs, so they cannot rot.

The README's first block (set-up, main job, tests) is what `.ci/run` executes
line by line; here we check its shape.  Every other block runs against a real
Prefect server and the local Modal server, as a user would type it: the
README's in README order, then each `docs/*.md` page's (by file name) in the
page's order, all sharing the module's servers and background commands;
python blocks as scripts, bash blocks in bash, long-running commands
(`prefect worker start`) in the background until the module ends.  A block
preceded by `<!-- readme-test: not run (REASON) -->` is reported as skipped
with that reason (e.g. `modal token new`, which needs an account).  Links
between these files (to a file, or a heading's anchor) must resolve.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prefect_modal.cli.services import Service, spawn, start_local_modal, start_prefect_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
NOT_RUN = re.compile(r"<!--\s*readme-test:\s*not run\s*\((?P<reason>[^)]*)\)\s*-->")
BACKGROUND = ("prefect worker start",)


@dataclass
class Block:
    file: str  # relative to the repository, e.g. "docs/local-server.md"
    lang: str
    code: str
    line: int
    not_run: str | None = None

    @property
    def id(self) -> str:
        return f"{self.file}:L{self.line}-{self.lang}"

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


def markdown_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = NOT_RUN.search(previous)
        blocks.append(
            Block(
                file=path.relative_to(ROOT).as_posix(),
                lang=opening.group(1),
                code="\n".join(body) + "\n",
                line=start + 1,
                not_run=marker.group("reason") if marker else None,
            )
        )
        i += 1
    return blocks


BLOCKS = markdown_blocks(README)
#: every block that runs: the README's after its first, then each docs page's, in order
RUN_BLOCKS = BLOCKS[1:] + [block for page in DOCS for block in markdown_blocks(page)]


def test_first_block_is_the_three_commands_ci_runs() -> None:
    first = BLOCKS[0]
    commands = [ln for ln in first.code.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 3, commands
    assert "pip install" in commands[0] and "constraints.txt" in commands[0]
    assert commands[1].endswith("prefect-modal demo")
    assert commands[2].endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and 'bash -c "${steps[2]}"' in ci


@dataclass
class Session:
    """Servers and background commands the blocks share, in order (README, then docs)."""

    env: dict[str, str]
    workdir: Path
    background: list[Service] = field(default_factory=list)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    workdir = tmp_path_factory.mktemp("readme")
    home = workdir / "home"
    home.mkdir()
    prefect = start_prefect_server(workdir / "prefect", ui=False)
    # as the README's worker block asks: the deployments directory, shown to sandboxes
    modal = start_local_modal(workdir / "modal", host_dirs=[ROOT / "deployments"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODAL_"))}
    env.update(modal.env)
    env.update(
        HOME=str(home),
        MODAL_CONFIG_PATH=str(home / ".modal.toml"),
        PREFECT_HOME=str(workdir / "prefect"),
        PREFECT_API_URL=str(prefect.url),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    state = Session(env=env, workdir=workdir)
    try:
        yield state
    finally:
        for service in [*reversed(state.background), modal, prefect]:
            service.stop()
        for service in [*state.background, modal, prefect]:
            assert service.process.poll() is not None, f"{service.name} still running"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_readme_block_runs(block: Block, session: Session) -> None:
    if block.not_run:
        pytest.skip(reason=f"{block.where}: {block.not_run}")
    stem = re.sub(r"\W", "_", block.file.removesuffix(".md"))
    if block.lang == "python":
        script = session.workdir / f"block_{stem}_{block.line}.py"
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
        result = subprocess.run(
            cmd, cwd=session.workdir, env=session.env, capture_output=True, text=True, timeout=240
        )
    elif block.lang == "bash":
        foreground = []
        for line in block.code.splitlines():
            if any(command in line for command in BACKGROUND):
                name = f"{stem}-L{block.line}"
                service = spawn(name, ["bash", "-c", line], session.env, session.workdir)
                session.background.append(service)
            else:
                foreground.append(line)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(foreground)],
            cwd=ROOT,
            env=session.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    else:
        pytest.fail(f"{block.where}: a ```{block.lang} block; tag it python or bash")
    assert result.returncode == 0, (
        f"{block.id}: the block at {block.where} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-30000:]}"
    )


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (outside code blocks)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_readme_and_docs_resolve(page: Path) -> None:
    broken = []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        for link in LINK.finditer(line):
            target = link.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:...
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            if not resolved.exists():
                broken.append(f"line {number}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"line {number}: {target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)

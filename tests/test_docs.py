"""Every Python code block of README.md and docs/*.md runs offline as written, unless its first line is a visible
``# downloads: ...`` or ``# needs: ...`` marker. Blocks of one file share a namespace, in order (a guide's later
block may use an earlier one's objects); network connections are refused while they run."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"# (downloads|needs): \S")


def python_blocks(path: Path) -> list[str]:
    """The Python code blocks of a markdown file, in order."""
    return BLOCK.findall(path.read_text())


def is_marked(block: str) -> bool:
    """True if the block's first line says what it downloads or needs (then it is not run)."""
    return bool(MARKER.match(block.lstrip().splitlines()[0]))


def test_blocks_are_found_and_most_run():
    blocks = [b for path in DOCS for b in python_blocks(path)]
    assert len(blocks) >= 10
    assert sum(not is_marked(b) for b in blocks) > sum(is_marked(b) for b in blocks)
    assert is_marked("# downloads: google/ddpm-cifar10-32 (140 MB)\nx = 1\n") and not is_marked("x = 1\n")


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_code_blocks_run_offline(path, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError(f"{path.name}: a code block without a '# downloads:' marker tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    try:
        for i, block in enumerate(python_blocks(path)):
            if not is_marked(block):
                exec(compile(block, f"{path.name}, python block {i + 1}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)


#: documents the sweep writes into its output folder (named in docs and code, not shipped)
GENERATED = {"results.md"}
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml", ".cfg", ".toml", ".txt", ".json"}


def test_no_file_refers_to_a_document_that_is_not_in_the_repository():
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
             and not {".git", "__pycache__", ".pytest_cache"} & set(p.relative_to(ROOT).parts)
             and p.parts[len(ROOT.parts)] not in ("results", "runs")]
    names = {p.name for p in files}
    missing = []
    for path in files:
        for ref in re.findall(r"[A-Za-z0-9_./-]+\.(?:md|ipynb)\b", path.read_text(errors="ignore")):
            name = Path(ref).name
            if not ((ROOT / ref).is_file() or (path.parent / ref).is_file() or name in names or name in GENERATED):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing

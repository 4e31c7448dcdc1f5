"""Packaging and layout rules: every package is shipped, the leaves stay leaves."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEAVES = ("ccied.cache", "ccied.pruning", "ccied.discovery")


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_folder_with_an_init_is_a_listed_package() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]  # type: ignore[index]
    packages = set(setuptools["packages"])
    folder_of = {
        (ROOT / folder).resolve(): name for name, folder in setuptools["package-dir"].items()
    }
    skip = {".venv", "build", "tests", ".git"}
    unlisted = []
    for init in ROOT.rglob("__init__.py"):
        folder = init.parent.resolve()
        if skip & set(folder.relative_to(ROOT).parts):
            continue
        # The package a folder becomes: its own mapping, else its parent's plus its name.
        name, walk, suffix = folder_of.get(folder), folder, []
        while name is None and walk != ROOT:
            suffix.insert(0, walk.name)
            walk = walk.parent
            name = folder_of.get(walk)
        full = ".".join([name, *suffix]) if name else str(folder)
        if full not in packages:
            unlisted.append(full)
    assert not unlisted, f"folders with __init__.py missing from pyproject packages: {unlisted}"
    for name, folder in setuptools["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), name
        assert (ROOT / folder / "py.typed").is_file(), name


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_packages_import_neither_the_peer_nor_sockets(leaf: str) -> None:
    code = (
        f"import sys, {leaf}; "
        "bad = sorted(m for m in sys.modules "
        "if m == 'zmq' or m.startswith(('zmq.', 'ccied.peer')));"
        "print(','.join(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    forbidden = [m for m in done.stdout.strip().split(",") if m]
    if leaf == "ccied.discovery":  # discovery may use sockets, never the peer
        forbidden = [m for m in forbidden if m.startswith("ccied.peer")]
    assert not forbidden, f"{leaf} imports {forbidden}"


def test_public_api_is_importable_from_the_top() -> None:
    import ccied

    assert ccied.Client.__module__ == "ccied.peer.client"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = (
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[dev]' "
        "&& .venv/bin/python -m pytest"
    )
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()

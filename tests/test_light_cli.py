"""The client side stays light: no torch, FAISS or zeroconf for what a camera app runs.

`ccied.Client`, `ccied submit`, `ccied status`, `ccied keys` and every --help
take a fraction of a second; loading torch alone takes seconds. Each case runs
the console script's main in a fresh interpreter and reads its sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

HEAVY = {"torch", "faiss", "zeroconf", "av"}
PROBE = """
import json, sys
from ccied.peer.entry import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("LOADED " + json.dumps({
    "code": code,
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & %r),
    "bench": sorted(m for m in sys.modules if m.startswith("ccied.bench.")),
}))
""" % (HEAVY,)  # noqa: UP031 (a set literal inside braces)


def _run(*argv: str) -> tuple[dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60
    )
    *output, last = done.stdout.splitlines()
    assert last.startswith("LOADED "), done.stdout + done.stderr
    return json.loads(last.removeprefix("LOADED ")), "\n".join(output) + done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["peer", "--help"],
        ["submit", "--help"],
        ["status", "--help"],
        ["keys", "--help"],
        ["cache", "--help"],
        ["splits", "--help"],
        ["prepare", "--help"],
        ["demo", "--help"],
        ["bench", "--help"],
    ],
    ids=" ".join,
)
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    loaded, output = _run(*argv)
    assert loaded["code"] == 0 and "usage: ccied" in output
    assert loaded["heavy"] == [] and loaded["bench"] == []


def test_submit_status_and_keys_load_nothing_heavy(tmp_path: Path) -> None:
    # No peer runs: submit and status fail (exit 2) once their module work is done.
    for argv, code in (
        (["status", "--socket", str(tmp_path / "none.sock")], 2),
        (["submit", "--socket", str(tmp_path / "none.sock"), "x.png"], 2),
        (["keys", "list", "--state-dir", str(tmp_path / "state")], 0),
    ):
        loaded, output = _run(*argv)
        assert loaded["code"] == code, output
        assert loaded["heavy"] == [] and loaded["bench"] == [], (argv, loaded)


def test_importing_the_client_loads_nothing_heavy() -> None:
    code = (
        "import sys, ccied; ccied.Client; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_benchmark_is_imported_only_when_named_and_shows_its_own_options() -> None:
    loaded, output = _run("bench", "cluster", "--help")
    assert loaded["code"] == 0 and "ccied.bench.cluster_bench" in loaded["bench"]
    others = {f"ccied.bench.{name}" for name in ("cache", "transfer", "fuzz", "chaos")}
    assert not others & set(loaded["bench"])
    assert "usage: ccied bench cluster" in output and "--workloads" in output
    # The module docstring's first paragraph describes it, as before.
    assert "against every baseline" in output


def test_version() -> None:
    loaded, output = _run("--version")
    assert loaded["code"] == 0 and output.strip() == f"ccied {version('ccied')}"

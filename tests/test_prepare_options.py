"""`ccied prepare`'s recovery options: a wrong value is one line and exit 2, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-ratio", "0"], "--keep-ratio: must be in (0, 1]"),
        (["--keep-ratio", "1.5"], "--keep-ratio: must be in (0, 1]"),
        (["--keep-ratio", "half"], "--keep-ratio: not a number"),
        (["--recover", "--keep-ratio", "1"], "--recover trains a reduced layer"),
        (["--recover", "--bits", "32"], "--recover trains for the codec"),
        (["--recover", "--bits", "3"], "invalid choice: 3"),
        (["--recover", "--recover-steps", "0"], "--recover-steps: must be at least 1"),
        (["--recover", "--augmentations", "-1"], "--augmentations: must be at least 0"),
        (["--recover", "--seed", "x"], "--seed: not an integer"),
    ],
)
def test_a_wrong_recovery_setting_is_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "bundle"
    done = subprocess.run(
        [sys.executable, "-m", "ccied.peer.cli", "prepare", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()

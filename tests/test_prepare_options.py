"""`ccied prepare`'s recovery options: a wrong value is one line and exit 2, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
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
        (["--recover", "--augmentations", "17"], "--augmentations from 0 to 16"),
        (["--recover", "--learning-rate", "0"], "--learning-rate: must be above 0"),
        (["--seed", "3", "--recover-steps", "5"], "--recover-steps, --seed: only with --recover"),
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


def test_a_variant_with_no_decisive_frame_held_out_is_unmeasured_there() -> None:
    # Never a perfect decisive score: the planner then holds it to its all-frame figure.
    from ccied.pruning.bundle import Variant
    from ccied.pruning.prepare import _measured

    variant = Variant("v", "blocks.11", 0.5, 2)
    agrees = np.array([True, False, True, True])
    row, measured = _measured(variant, agrees, np.zeros(4, dtype=bool), [10, 12, 11, 9], 100)
    assert measured.agreement == 0.75 and measured.agreement_decisive is None
    assert row["agreement_decisive"] is None and row["decisive_frames"] == 0
    row, measured = _measured(variant, agrees, np.array([True, True, False, False]), [1], 100)
    assert measured.agreement_decisive == 0.5

"""`ccied bench cloud`'s options: a zero or negative count is refused by the parser, in one
line, instead of silently becoming the default (``--rounds 0`` ran three rounds)."""

from __future__ import annotations

import argparse

import pytest
from ccied.bench import cloud


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds: must be at least 1, got 0"),
        (["--frames", "0"], "--frames: must be at least 1, got 0"),
        (["--concurrency", "4", "0"], "--concurrency: must be at least 1, got 0"),
        (["--duration-s", "0"], "--duration-s: must be above 0, got 0"),
        (["--max-batch", "-1"], "--max-batch: must be at least 1, got -1"),
        (["--threads", "two"], "--threads: not an integer: 'two'"),
    ],
)
def test_a_bad_count_is_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="ccied bench cloud")
    cloud.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(args)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(message), error


def test_good_counts_parse() -> None:
    parser = argparse.ArgumentParser()
    cloud.add_arguments(parser)
    parsed = parser.parse_args(["--rounds", "1", "--concurrency", "1", "16", "--duration-s", "2"])
    assert (parsed.rounds, parsed.concurrency, parsed.duration_s) == (1, [1, 16], 2.0)

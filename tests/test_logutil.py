"""One WarnOnce: a hostile flood of distinct keys gives a few lines a minute, counted."""

from __future__ import annotations

import logging

import pytest
from ccied.discovery.logutil import WarnOnce, suppressed_warnings


def test_a_flood_of_fresh_keys_logs_a_few_lines_per_kind_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    warn = WarnOnce(logging.getLogger("t.flood"), burst=5, window_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.flood"):
        for i in range(2000):  # 2,000 handshakes, each with a fresh untrusted key
            warn(f"zap-denied:key{i}", "refused key %s", f"key{i}")
        warn("malformed:svc", "bad announcement")  # another kind has its own budget
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6
    assert warn.suppressed() == {"zap-denied": 1995}
    assert suppressed_warnings()["zap-denied"] >= 1995
    caplog.clear()
    now[0] = 61.0  # the next minute: the next line says what was held back
    with caplog.at_level(logging.WARNING, logger="t.flood"):
        warn("zap-denied:another", "refused key %s", "another")
    assert "1995 more zap-denied warnings were not shown" in caplog.records[0].getMessage()


def test_repeats_of_a_key_go_to_debug_and_memory_stays_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warn = WarnOnce(logging.getLogger("t.repeat"), max_keys=3, burst=100)
    with caplog.at_level(logging.DEBUG, logger="t.repeat"):
        warn("garbage:a", "first")
        warn("garbage:a", "again")
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]
    for i in range(10):
        warn(f"garbage:{i}", "x")
    assert len(warn._seen) == 3  # an LRU, not one entry per key ever seen
    warn.forget("garbage:9")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t.repeat"):
        warn("garbage:9", "back")
    assert len(caplog.records) == 1

"""Logging helpers: a repeating error logs WARNING once, then DEBUG."""

from __future__ import annotations

import logging
import threading


class WarnOnce:
    """Log the first occurrence of each ``key`` at WARNING and repeats at DEBUG.

    A peer that receives garbage from a misbehaving neighbour every millisecond
    must not flood its log; the first line tells the operator, DEBUG keeps the rest.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        level = logging.WARNING if first else logging.DEBUG
        self._logger.log(level, message, *args)

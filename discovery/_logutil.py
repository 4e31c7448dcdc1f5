"""A repeating problem logs WARNING once, then DEBUG, with a bounded memory."""

from __future__ import annotations

import logging

# Keys come partly from the network (service instance names); past this many
# a hostile flood of distinct names only produces DEBUG lines, not memory.
MAX_WARNING_KEYS = 256


class WarnOnce:
    """Log the first occurrence of each ``key`` at WARNING and repeats at DEBUG.

    A neighbour that announces garbage every second must not flood the log: the
    first line tells the operator, DEBUG keeps the rest (python-zeroconf's
    ``log_warning_once`` does the same).
    """

    def __init__(self, logger: logging.Logger, max_keys: int = MAX_WARNING_KEYS) -> None:
        self._logger = logger
        self._max_keys = max_keys
        self._seen: set[str] = set()

    def __call__(self, key: str, message: str, *args: object) -> None:
        first = key not in self._seen and len(self._seen) < self._max_keys
        if first:
            self._seen.add(key)
        self._logger.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def forget(self, key: str) -> None:
        """Let ``key`` warn again (the problem went away and may come back)."""
        self._seen.discard(key)

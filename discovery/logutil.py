"""Warnings that cannot flood the log: once per key, and a few per kind a minute.

A key is ``KIND:DETAIL`` (``zap-denied:<key>``, ``malformed:<service>``). The
first occurrence of a key logs at WARNING, repeats at DEBUG. Keys often come
from the network, so per-key memory alone is no defence: 2,000 handshakes with
fresh untrusted keys once gave 2,000 WARNING lines in 12.6 s. So each *kind*
also gets at most ``burst`` WARNING lines per ``window_s``; the rest go to
DEBUG and are counted (``suppressed()``, shown by ``ccied status``), and the
next line of that kind says how many were held back. The key memory is an
LRU of ``max_keys``. One implementation for the whole process: ``peer/`` uses
this leaf's, since leaves cannot import ``ccied.peer``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

MAX_WARNING_KEYS = 256
BURST = 5
WINDOW_S = 60.0

_instances: weakref.WeakSet[WarnOnce] = weakref.WeakSet()


class WarnOnce:
    """Log ``message`` at WARNING for a new ``key`` (within its kind's budget), else DEBUG."""

    def __init__(
        self,
        logger: logging.Logger,
        max_keys: int = MAX_WARNING_KEYS,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._max_keys = max_keys
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._windows: dict[str, tuple[float, int]] = {}  # kind -> (start, lines logged)
        self._held: dict[str, int] = {}  # kind -> suppressed since its last WARNING line
        self._suppressed: dict[str, int] = {}  # kind -> suppressed in all
        self._lock = threading.Lock()
        _instances.add(self)

    def __call__(self, key: str, message: str, *args: object) -> None:
        kind = key.split(":", 1)[0]
        held = 0
        with self._lock:
            first = key not in self._seen
            if first:
                self._seen[key] = None
                if len(self._seen) > self._max_keys:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(key)
            warn = first and self._take(kind)
            if first and not warn:
                self._held[kind] = self._held.get(kind, 0) + 1
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            elif warn:
                held = self._held.pop(kind, 0)
        if warn and held:
            message += " (%d more %s warnings were not shown; `ccied status` counts them)"
            args = (*args, held, kind)
        self._logger.log(logging.WARNING if warn else logging.DEBUG, message, *args)

    def _take(self, kind: str) -> bool:
        now = self._clock()
        start, count = self._windows.get(kind, (now, 0))
        if now - start >= self._window_s:
            start, count = now, 0
        if count >= self._burst:
            return False
        self._windows[kind] = (start, count + 1)
        return True

    def forget(self, key: str) -> None:
        """Let ``key`` warn again (the problem went away and may come back)."""
        with self._lock:
            self._seen.pop(key, None)

    def suppressed(self) -> dict[str, int]:
        """WARNING lines held back so far, by kind."""
        with self._lock:
            return dict(self._suppressed)


def suppressed_warnings() -> dict[str, int]:
    """Held-back WARNING lines by kind, over every WarnOnce in this process."""
    total: dict[str, int] = {}
    for instance in list(_instances):
        for kind, count in instance.suppressed().items():
            total[kind] = total.get(kind, 0) + count
    return dict(sorted(total.items()))


__all__ = ["WarnOnce", "suppressed_warnings"]

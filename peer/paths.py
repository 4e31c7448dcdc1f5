"""Where local peers keep their sockets: light, so clients need not import the daemon."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    """Per-user folder for local sockets: $XDG_RUNTIME_DIR/ccied or /tmp/ccied-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "ccied"
    return Path(f"/tmp/ccied-{os.getuid()}")


def default_socket_path(name: str) -> Path:
    """Where a peer called ``name`` listens for applications unless told otherwise."""
    return runtime_dir() / f"{name}.sock"


__all__ = ["default_socket_path", "runtime_dir"]

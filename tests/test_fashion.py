"""Fashion-MNIST: a pruned transfer layer recovered by distillation, without labels."""

from __future__ import annotations

import copy

import pytest
import torch
from ccied.pruning.codec import CodecConfig, TensorCodec
from ccied.pruning.errors import MediaError
from ccied.pruning.fashion import (
    FashionCNN,
    FashionConfig,
    FashionData,
    _inputs,
    _train,
    distill_pruned,
    load_fashion_mnist,
    predictions,
    prune_transfer_channels,
    teacher_logits,
)


@pytest.fixture(scope="module")
def data() -> FashionData:
    try:
        return load_fashion_mnist()
    except MediaError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


def test_distillation_recovers_agreement_without_labels(data: FashionData) -> None:
    """A small CNN trained on 800 labelled images, cut to 4 of 16 channels at 4 bits:
    one epoch of distillation on 3,000 images (labels unused) brings its test answers
    closer to the unpruned CNN's, and moves nothing but the layers next to the cut."""
    torch.manual_seed(0)
    config = FashionConfig(bits=4, batch_size=64, recover_epochs=1)
    train_x = _inputs(data.train_images[:800])
    unlabelled = _inputs(data.train_images[800:3800])
    test_x = _inputs(data.test_images[:1000])
    teacher = FashionCNN(width=16)
    _train(teacher, train_x, torch.from_numpy(data.train_labels[:800]), 2, config, 3e-3)
    pruned = prune_transfer_channels(teacher, 4, train_x)
    student = copy.deepcopy(pruned)
    distill_pruned(student, teacher_logits(teacher, unlabelled), unlabelled, config)
    reference, _ = predictions(teacher, test_x)
    codec = TensorCodec(CodecConfig(bits=config.bits))
    before = float((predictions(pruned, test_x, codec)[0] == reference).float().mean())
    after = float((predictions(student, test_x, codec)[0] == reference).float().mean())
    assert after >= before + 0.1
    frozen = ("head.0.", "head.1.", "tail.1.", "tail.5.")
    pruned_state = pruned.state_dict()
    for key, value in student.state_dict().items():
        if key.startswith(frozen):
            assert torch.equal(value, pruned_state[key]), key
    assert not torch.equal(student.tail[0].weight, pruned.tail[0].weight)
    assert all(p.requires_grad for p in student.parameters())

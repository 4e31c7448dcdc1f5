"""Model registry, split points and head/tail equivalence on real weights and frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ccied.pruning import ModelError, StagedModel, load_model, preprocess


def test_every_split_point_reproduces_the_full_model(
    model: StagedModel, cat_pixels: np.ndarray, bikes_frames: list[np.ndarray]
) -> None:
    x = torch.cat([preprocess(p, model.spec) for p in [cat_pixels, *bikes_frames[:2]]])
    with torch.inference_mode():
        expected = model.full()(x)
        for point in model.split_points():
            head, tail = model.split(point.name)
            middle = head(x)
            assert tuple(middle.shape[1:]) == point.output_shape, point.name
            difference = (tail(middle) - expected).abs().max().item()
            assert difference < 1e-4, f"{point.name}: max abs difference {difference}"


def test_split_points_describe_size_and_compute(model: StagedModel) -> None:
    points = model.split_points()
    names = [p.name for p in points]
    assert names[0] == "stem" and "blocks.11" in names and "blocks.14" in names
    assert "classifier" not in names  # cutting after the last stage sends the answer
    fractions = [p.compute_fraction for p in points]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    b14 = model.split_point("blocks.14")
    assert b14.output_shape == (192, 7, 7)
    assert b14.float32_bytes == 192 * 7 * 7 * 4
    assert b14.stage_end and not model.split_point("blocks.13").stage_end


def test_real_weights_recognise_a_cat(model: StagedModel, cat_pixels: np.ndarray) -> None:
    with torch.inference_mode():
        probs = torch.softmax(model.full()(preprocess(cat_pixels, model.spec)), dim=1)[0]
    top5 = [model.spec.class_names[i] for i in probs.topk(5).indices.tolist()]
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5[:2]), top5


def test_unknown_model_and_split_are_clear_errors(model: StagedModel) -> None:
    with pytest.raises(ModelError, match="known models: efficientnet_lite0"):
        load_model("resnet9000")
    with pytest.raises(ModelError, match=r"no split point 'blocks\.99'.*valid: stem"):
        model.split("blocks.99")


def test_the_class_names_are_imagenets(model: StagedModel) -> None:
    assert len(model.spec.class_names) == 1000 and model.spec.class_names[281] == "tabby"

"""Pooled features: exactly what the classifier sees, any item source, and a disk cache that is instant and safe."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from model.datasets import PhantomSource
from model.engine import prepare
from model.features import (
    FeatureError,
    FeatureSet,
    cached_features,
    compute_features,
    phantom_features,
    phantom_source_key,
    source_features,
    source_key,
    state_digest,
)
from model.network import Architecture, DenseNet
from model.types import PreprocessRecipe
from tests.nets import one_thread

RECIPE = PreprocessRecipe(input_size=64, resize=None)


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _model(seed: int = 0) -> DenseNet:
    torch.manual_seed(seed)
    return DenseNet(Architecture.tiny()).eval()


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((80, 72)).astype(np.float32) for _ in range(n)]


def _labels(i: int) -> np.ndarray:
    y = np.zeros(14, np.uint8)
    y[i % 14] = 1
    return y


def test_pooled_features_are_what_the_classifier_sees() -> None:
    model = _model()
    images = _images(10)
    seen: list[tuple[str, int, int]] = []
    fs = compute_features(model, [(f"img{i}", f"P{i // 2}", im, _labels(i)) for i, im in enumerate(images)],
                          recipe=RECIPE, batch_size=4, device="cpu", progress=lambda *a: seen.append(a))
    assert fs.pooled.shape == (10, model.architecture.feature_channels) and fs.pooled.dtype == np.float32
    assert fs.ids == tuple(f"img{i}" for i in range(10)) and fs.patients[3] == "P1"
    assert [row.argmax() for row in fs.labels] == [i % 14 for i in range(10)]
    assert seen == [("features", 4, 10), ("features", 8, 10), ("features", 10, 10)]
    x = torch.stack([prepare(im, RECIPE) for im in images]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + 4]) for i in range(0, 10, 4)])  # same batches, same memory format
        pooled = torch.from_numpy(fs.pooled)
        from_features = torch.cat([model.classifier(pooled[i : i + 4]) for i in range(0, 10, 4)])
    assert torch.equal(logits, from_features)  # bit for bit: the same pooling, the same input to the head


def test_prepared_tensors_and_decoded_images_give_the_same_features() -> None:
    model = _model()
    images = _images(3)
    decoded = compute_features(model, [(str(i), None, im, _labels(i)) for i, im in enumerate(images)], recipe=RECIPE)
    prepared = compute_features(model, [(str(i), None, prepare(im, RECIPE), _labels(i)) for i, im in
                                        enumerate(images)], recipe=RECIPE)
    np.testing.assert_array_equal(decoded.pooled, prepared.pooled)
    assert decoded.patients == (None, None, None)


def test_bad_items_are_named() -> None:
    model = _model()
    with pytest.raises(FeatureError, match="'b'.*labels"):
        compute_features(model, [("a", None, _images(1)[0], _labels(0)), ("b", None, _images(1)[0], np.ones(3))],
                         recipe=RECIPE)
    with pytest.raises(FeatureError, match="'c'.*shape"):
        compute_features(model, [("c", None, torch.zeros(3, 32, 32), _labels(0))], recipe=RECIPE)
    with pytest.raises(FeatureError, match="'d'.*NaN"):
        compute_features(model, [("d", None, np.full((64, 64), np.nan, np.float32), _labels(0))], recipe=RECIPE)
    with pytest.raises(FeatureError, match="no images"):
        compute_features(model, [], recipe=RECIPE)


def test_phantom_features_match_the_phantom_source() -> None:
    model = _model()
    fs = phantom_features(model, recipe=RECIPE, split="val", count=6, render_size=64)
    source = PhantomSource("val", count=6, size=64)
    assert fs.ids == source.ids and fs.patients == source.patients
    np.testing.assert_array_equal(fs.labels, source.labels)
    by_source = source_features(model, source, recipe=RECIPE)
    assert by_source.ids == fs.ids
    # render_split keeps inputs as float16: the same images within half-precision rounding
    np.testing.assert_allclose(by_source.pooled, fs.pooled, rtol=0.02, atol=0.02)


def test_the_cache_is_keyed_by_weights_data_and_recipe(tmp_path: Path) -> None:
    model = _model()
    calls: list[int] = []

    def compute() -> FeatureSet:
        calls.append(1)
        return compute_features(model, [(str(i), None if i % 2 else f"P{i}", im, _labels(i))
                                         for i, im in enumerate(_images(4))], recipe=RECIPE, source="four images")

    key = {"weights_sha256": state_digest(model), "data_key": "four", "recipe": RECIPE}
    first, hit = cached_features(tmp_path, **key, compute=compute)
    assert not hit and len(calls) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again, hit = cached_features(tmp_path, **key, compute=compute)
    assert hit and len(calls) == 1
    np.testing.assert_array_equal(again.pooled, first.pooled)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.ids == first.ids and again.patients == first.patients and again.source == "four images"
    for change in ({"weights_sha256": state_digest(_model(seed=1))}, {"data_key": "five"},
                   {"recipe": PreprocessRecipe(input_size=64, resize=None, normalization="xrv", channels=1)}):
        _, hit = cached_features(tmp_path, **(key | change), compute=compute)
        assert not hit
    assert len(calls) == 4
    cache_file = sorted(tmp_path.glob("*.npz"), key=lambda p: p.stat().st_mtime)[0]
    cache_file.write_bytes(b"not an npz file")  # a damaged cache is recomputed, never trusted
    recomputed, hit = cached_features(tmp_path, **key, compute=compute)
    assert not hit and len(calls) == 5
    np.testing.assert_array_equal(recomputed.pooled, first.pooled)
    _, hit = cached_features(None, **key, compute=compute)
    assert not hit and len(calls) == 6


def test_source_keys_change_with_the_data() -> None:
    assert phantom_source_key("val", seed=0, count=10) != phantom_source_key("val", seed=0, count=11)
    a, b = PhantomSource("val", count=5, size=64), PhantomSource("val", count=6, size=64)
    assert source_key(a) == source_key(PhantomSource("val", count=5, size=64)) != source_key(b)
    model = _model()
    digest = state_digest(model)
    with torch.no_grad():
        model.classifier.bias[0] += 1e-3
    assert state_digest(model) != digest


def test_feature_sets_validate_and_subset() -> None:
    pooled = np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = np.zeros((4, 14), np.uint8)
    fs = FeatureSet(ids=list("abcd"), patients=[None, "p", "p", None], pooled=pooled, labels=labels)
    part = fs.subset(np.array([True, False, True, False]))
    assert part.ids == ("a", "c") and part.patients == (None, "p")
    np.testing.assert_array_equal(part.pooled, pooled[[0, 2]])
    assert fs.subset([3, 1]).ids == ("d", "b") and fs.channels == 3 and len(fs) == 4
    with pytest.raises(FeatureError, match="float32"):
        FeatureSet(ids=list("abcd"), patients=[None] * 4, pooled=pooled.astype(np.float64), labels=labels)
    with pytest.raises(FeatureError, match="uint8"):
        FeatureSet(ids=list("abcd"), patients=[None] * 4, pooled=pooled, labels=labels[:3])
    with pytest.raises(FeatureError, match="NaN"):
        FeatureSet(ids=["a"], patients=[None], pooled=np.array([[np.nan]], np.float32), labels=labels[:1])

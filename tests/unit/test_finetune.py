"""Head fine-tuning on cached features: it learns, stops early on the validation loss, keeps the best head, and
changes nothing but the head."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from model.features import FeatureSet
from model.finetune import FinetuneError, finetune_head, head_aurocs, pos_weights, with_head
from model.network import Architecture, DenseNet
from model.types import LABELS
from tests.nets import one_thread


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _teacher(seed: int = 0, channels: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = (rng.normal(0, 1.0, (14, channels)) * (rng.random((14, channels)) < 0.3)).astype(np.float32)
    return weight, np.full(14, -2.0, np.float32)


def _features(n: int, teacher: tuple[np.ndarray, np.ndarray], seed: int) -> FeatureSet:
    """Features whose labels follow a known linear head (noisy, like real labels)."""
    rng = np.random.default_rng(seed)
    weight, bias = teacher
    pooled = rng.gamma(2.0, 0.5, (n, weight.shape[1])).astype(np.float32)
    p = 1 / (1 + np.exp(-(pooled @ weight.T + bias)))
    labels = (rng.random(p.shape) < p).astype(np.uint8)
    return FeatureSet(ids=[f"{seed}:{i}" for i in range(n)], patients=[None] * n, pooled=pooled, labels=labels)


def _bce(fs: FeatureSet, weight: np.ndarray, bias: np.ndarray, pw: np.ndarray) -> float:
    z = torch.from_numpy(fs.pooled @ weight.T + bias)
    return float(torch.nn.functional.binary_cross_entropy_with_logits(
        z, torch.from_numpy(fs.labels.astype(np.float32)), pos_weight=torch.from_numpy(pw)))


def test_fine_tuning_learns_the_head_and_reports_per_class_changes() -> None:
    teacher = _teacher()
    train, val = _features(3000, teacher, seed=1), _features(1000, teacher, seed=2)
    rng = np.random.default_rng(3)
    start_w = (teacher[0] + rng.normal(0, 0.8, teacher[0].shape)).astype(np.float32)  # a poor head to start from
    start_b = np.zeros(14, np.float32)
    result = finetune_head(train, val, start_w, start_b, max_epochs=300, patience=10, lr=0.05)

    pw = pos_weights(train.labels, "sqrt")
    assert result.val_loss_before == pytest.approx(_bce(val, start_w, start_b, pw), rel=1e-5)
    assert result.val_loss_after == pytest.approx(_bce(val, result.weight, result.bias, pw), rel=1e-5)
    assert result.val_loss_after < 0.9 * result.val_loss_before
    assert result.mean_auroc_after > result.mean_auroc_before + 0.02
    assert result.auroc_after == head_aurocs(val, result.weight, result.bias)
    assert result.auroc_before == head_aurocs(val, start_w, start_b)
    data = result.to_dict()
    assert [c["label"] for c in data["per_class"]] == list(LABELS) and data["train_images"] == 3000
    assert data["seconds"] >= 0 and data["epochs"] == result.epochs and "weight" not in data
    # it ranks nearly as well as the head that generated the labels (pos_weight shifts the bias, not the ranking)
    teacher_auroc = float(np.mean([a for a in head_aurocs(val, *teacher) if a is not None]))
    assert teacher_auroc - 0.02 < result.mean_auroc_after <= teacher_auroc + 0.01


def test_early_stopping_returns_the_best_epoch() -> None:
    teacher = _teacher(seed=4)
    train, val = _features(800, teacher, seed=5), _features(300, teacher, seed=6)
    result = finetune_head(train, val, teacher[0], teacher[1], max_epochs=500, patience=5, lr=0.05)
    assert result.stopped_early and result.epochs < 500
    assert result.epochs == result.best_epoch + 5
    val_losses = [loss for _, _, loss in result.history]
    assert len(val_losses) == result.epochs
    assert result.val_loss_after == min(val_losses) == val_losses[result.best_epoch - 1]


def test_the_original_head_is_kept_when_no_epoch_beats_it() -> None:
    teacher = _teacher(seed=7)
    train, val = _features(500, teacher, seed=8), _features(200, teacher, seed=9)
    result = finetune_head(train, val, teacher[0], teacher[1], max_epochs=50, patience=3, lr=50.0)  # diverges
    assert result.best_epoch == 0 and result.epochs == 3
    np.testing.assert_array_equal(result.weight, teacher[0])
    np.testing.assert_array_equal(result.bias, teacher[1])
    assert result.val_loss_after == result.val_loss_before


def test_same_seed_same_head_and_the_label_order_is_respected() -> None:
    teacher = _teacher(seed=10)
    train, val = _features(600, teacher, seed=11), _features(200, teacher, seed=12)
    a = finetune_head(train, val, teacher[0], teacher[1], max_epochs=20, patience=20, lr=0.01, batch_size=128)
    b = finetune_head(train, val, teacher[0], teacher[1], max_epochs=20, patience=20, lr=0.01, batch_size=128)
    np.testing.assert_array_equal(a.weight, b.weight)
    reverse = LABELS[::-1]
    r = finetune_head(train, val, teacher[0][::-1].copy(), teacher[1][::-1].copy(), labels=reverse, max_epochs=20,
                      patience=20, lr=0.01, batch_size=128)
    np.testing.assert_allclose(r.weight[::-1], a.weight, rtol=1e-4, atol=1e-5)
    assert r.auroc_after[::-1] == pytest.approx(a.auroc_after, abs=1e-6)


def test_pos_weights() -> None:
    labels = np.zeros((100, 14), np.uint8)
    labels[:20, 0] = 1  # prevalence 0.2
    labels[:, 1] = 1  # 1.0 -> clipped to 0.5
    np.testing.assert_allclose(pos_weights(labels, "balanced")[:2], [4.0, 1.0])
    np.testing.assert_allclose(pos_weights(labels, "sqrt")[:2], [2.0, 1.0])
    assert pos_weights(labels, "balanced")[2] == pytest.approx(999.0)  # absent: prevalence clipped to 1e-3
    np.testing.assert_array_equal(pos_weights(labels, "none"), np.ones(14, np.float32))
    with pytest.raises(FinetuneError, match="class_weighting"):
        pos_weights(labels, "inverse")  # type: ignore[arg-type]


def test_only_the_head_of_a_network_changes() -> None:
    torch.manual_seed(0)
    model = DenseNet(Architecture.tiny()).eval()
    channels = model.architecture.feature_channels
    teacher = _teacher(seed=13, channels=channels)
    train, val = _features(400, teacher, seed=14), _features(200, teacher, seed=15)
    head = model.classifier
    result = finetune_head(train, val, head.weight.detach().numpy(), head.bias.detach().numpy(), max_epochs=30,
                           lr=0.05)
    tuned = with_head(model, result.weight, result.bias)
    before, after = model.state_dict(), tuned.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"classifier.weight", "classifier.bias"}
    np.testing.assert_array_equal(after["classifier.weight"].numpy(), result.weight)
    with pytest.raises(FinetuneError, match="head"):
        with_head(model, result.weight[:, :3], result.bias)


def test_unusable_inputs_are_errors() -> None:
    teacher = _teacher()
    fs = _features(50, teacher, seed=0)
    w, b = teacher
    with pytest.raises(FinetuneError, match="head"):
        finetune_head(fs, fs, w[:13], b)
    with pytest.raises(FinetuneError, match="channels"):
        finetune_head(fs, fs, w[:, :8], b)
    for bad in ({"max_epochs": 0}, {"patience": 0}, {"batch_size": 0}, {"lr": 0.0}, {"weight_decay": -1.0}):
        with pytest.raises(FinetuneError):
            finetune_head(fs, fs, w, b, **bad)  # type: ignore[arg-type]

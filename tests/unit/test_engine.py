"""The inference engine: one forward pass gives logits, CAMs and exact channel evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from model.engine import IMAGENET_MEAN, IMAGENET_STD, Engine, InputError, prepare
from model.errors import ModelError
from model.types import LABELS, XRV_RECIPE, PreprocessRecipe

RECIPE = PreprocessRecipe(input_size=96, resize=112)


class TinyDenseNet(nn.Module):
    """A small torchvision DenseNet exposing the engine's contract."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8,
                                               num_classes=14)
        if in_channels != 3:
            self.net.features.conv0 = nn.Conv2d(in_channels, 8, 7, 2, 3, bias=False)
        self.classifier = self.net.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _image(seed: int = 0, shape: tuple[int, int] = (130, 120)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(TinyDenseNet(), recipe=RECIPE, model_version="abc123", top_k=5, batch_size=2)


def test_logits_match_the_plain_forward_and_probabilities_are_their_sigmoid(engine: Engine) -> None:
    images = [_image(i) for i in range(3)]
    predictions = engine.predict(images)
    with torch.no_grad():
        reference = engine.model(torch.stack([prepare(im, RECIPE) for im in images])).numpy()
    for pred, ref in zip(predictions, reference, strict=True):
        np.testing.assert_allclose(pred.logits, ref, atol=1e-5)
        np.testing.assert_allclose(pred.probabilities, 1 / (1 + np.exp(-ref)), atol=1e-6)
        assert pred.labels == LABELS and pred.model_version == "abc123"


def test_channel_contributions_plus_bias_sum_to_each_logit(engine: Engine) -> None:
    image = _image(5)
    (pred,) = engine.predict([image])
    phi = engine.contributions(image)
    assert phi.shape == (14, engine.weight.shape[1])
    np.testing.assert_allclose(phi.sum(axis=1) + pred.bias, pred.logits, atol=1e-4)
    top = np.take_along_axis(phi, pred.top_channels.astype(np.int64), axis=1)
    np.testing.assert_allclose(top, pred.top_contributions, atol=1e-6)
    assert np.all(np.abs(pred.top_contributions[:, :1]) >= np.abs(phi).max(axis=1, keepdims=True) - 1e-7)


def test_cam_averages_to_logit_minus_bias_and_equals_grad_cam(engine: Engine) -> None:
    image = _image(7)
    (pred,) = engine.predict([image])
    assert pred.cams.shape == (14, 3, 3)  # 96 px / 32
    np.testing.assert_allclose(pred.cams.mean(axis=(1, 2)) + pred.bias, pred.logits, atol=1e-4)

    # Grad-CAM at the post-ReLU features: weights = spatial mean of d logit_c / d A = W_c / (h*w); same map.
    x = prepare(image, RECIPE)[None]
    features = engine.model.forward_features(x).detach().requires_grad_(True)
    logits = engine.model.classifier(features.mean(dim=(2, 3)))
    c = 2
    (grad,) = torch.autograd.grad(logits[0, c], features)
    alpha = grad.mean(dim=(2, 3), keepdim=True) * features.shape[2] * features.shape[3]
    grad_cam = (alpha * features).sum(dim=1)[0].detach().numpy()
    np.testing.assert_allclose(pred.cams[c], grad_cam, atol=1e-5)


def test_batching_does_not_change_results(engine: Engine) -> None:
    images = [_image(i) for i in range(5)]
    batched = engine.predict(images)
    single = [engine.predict([im])[0] for im in images]
    for a, b in zip(batched, single, strict=True):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((128, 128, 3), np.float32), "2-D"),
        (np.zeros((128, 128), np.uint16), "dtype"),
        (np.full((128, 128), np.nan, np.float32), "NaN"),
        (np.full((128, 128), 0.5, np.float32), "constant"),
        (np.random.default_rng(0).random((40, 128)).astype(np.float32), "smaller than 64"),
        (np.random.default_rng(0).random((128, 128)).astype(np.float32) * 3, "expected [0, 1]"),
    ],
    ids=["rgb", "uint16", "nan", "constant", "tiny", "range"],
)
def test_bad_images_are_refused_with_a_clear_error(engine: Engine, bad: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.predict([_image(0), bad])


def test_prepare_follows_the_recipe() -> None:
    image = _image(1, (300, 200))
    chexnet = prepare(image, PreprocessRecipe(input_size=224, resize=256))
    assert chexnet.shape == (3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    grey = chexnet * std + mean
    torch.testing.assert_close(grey[0], grey[2])
    assert float(grey[:, :, :10].max()) < 1e-5, "the narrow image is padded with air, not stretched"
    xrv = prepare(image, XRV_RECIPE)
    assert xrv.shape == (1, 224, 224)
    assert -1024 <= float(xrv.min()) and float(xrv.max()) <= 1024 and float(xrv.max()) > 500


def test_one_channel_models_run_with_their_recipe() -> None:
    engine = Engine(TinyDenseNet(in_channels=1), recipe=PreprocessRecipe(channels=1, input_size=96, resize=None,
                                                                          normalization="xrv"), model_version="x")
    (pred,) = engine.predict([_image(3)])
    assert np.all(np.isfinite(pred.logits))


def test_a_model_without_the_contract_is_refused() -> None:
    with pytest.raises(ModelError, match="forward_features"):
        Engine(nn.Linear(3, 14), recipe=RECIPE, model_version="x")
    with pytest.raises(ModelError, match="13 labels"):
        Engine(TinyDenseNet(), recipe=RECIPE, model_version="x", labels=LABELS[:13])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run on the device machine)")
def test_cuda_bf16_graph_path_agrees_with_cpu_within_bf16_tolerance() -> None:
    model = TinyDenseNet()
    cpu = Engine(model, recipe=RECIPE, model_version="x")
    images = [_image(i) for i in range(3)]
    expected = np.stack([p.logits for p in cpu.predict(images)])
    gpu = Engine(TinyDenseNet(), recipe=RECIPE, model_version="x", device="cuda", cuda_graph_batch_sizes=(1, 4))
    got = np.stack([p.logits for p in gpu.predict(images)])
    np.testing.assert_allclose(got, expected, atol=0.05, rtol=0.05)


def test_dynamic_batcher_batches_concurrent_requests_and_isolates_bad_images(engine: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from model.batcher import DynamicBatcher

    batcher = DynamicBatcher(engine, max_batch=4, max_wait_ms=50)
    images = [_image(i) for i in range(8)] + [np.full((128, 128), 0.5, np.float32)]
    with ThreadPoolExecutor(9) as pool:
        futures = list(pool.map(batcher.submit, images))
    results = [f.exception() or f.result() for f in futures]
    batcher.close()
    assert isinstance(results[-1], InputError)
    expected = engine.predict(images[:8])
    for got, want in zip(results[:8], expected, strict=True):
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    assert batcher.batches_run < 9, "concurrent requests were batched"


def test_engine_runs_chexd_densenets_including_pruned_heads() -> None:
    from model.network import Architecture, DenseNet
    from tests.nets import randomize

    base = Architecture.tiny()
    pruned = Architecture.from_dict({**base.to_dict(), "head_inputs": list(range(0, base.feature_channels, 2))})
    for arch in (base, pruned):
        model = randomize(DenseNet(arch)).eval()
        engine = Engine(model, recipe=RECIPE, model_version="x")
        image = _image(11)
        (pred,) = engine.predict([image])
        with torch.no_grad():
            np.testing.assert_allclose(pred.logits, model(prepare(image, RECIPE)[None])[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(engine.contributions(image).sum(axis=1) + pred.bias, pred.logits, atol=1e-4)


class _DataDependent(TinyDenseNet):
    """Branches on the input's values: a trace would bake in the branch taken on its first batch."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = super().forward_features(x)
        return features * 2 if float(x.mean()) > 0 else features


class _Untraceable(TinyDenseNet):
    """Leaves torch for numpy inside forward_features, which TorchScript tracing cannot record."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(super().forward_features(x).numpy().copy())


def test_cpu_path_runs_a_frozen_graph_equal_to_the_eager_model() -> None:
    images = [_image(i) for i in range(3)]
    frozen = Engine(TinyDenseNet(), recipe=RECIPE, model_version="v", batch_size=3)
    eager = Engine(TinyDenseNet(), recipe=RECIPE, model_version="v", batch_size=3, freeze=False)
    for got, want in zip(frozen.predict(images), eager.predict(images), strict=True):
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
    (graph,) = frozen._frozen.values()
    assert isinstance(graph, torch.jit.ScriptModule)
    assert not eager._frozen


class _BatchBaked(TinyDenseNet):
    """Slices the batch with a Python int, which a trace records as a constant (wrong for other batch sizes)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x)[: int(x.shape[0])]


@pytest.mark.parametrize("model_class", [_DataDependent, _Untraceable, _BatchBaked])
def test_models_the_trace_cannot_capture_run_eagerly_with_the_same_results(
    model_class: type[TinyDenseNet], caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(model_class(), recipe=RECIPE, model_version="v", batch_size=1)
    dark, bright = np.full((96, 96), 0.05, np.float32), np.full((96, 96), 0.9, np.float32)
    dark[0, 0] = bright[0, 0] = 0.5  # not constant
    with caplog.at_level("WARNING", logger="model.engine"):
        first, second = engine.predict([dark, bright])
    assert "running the model eagerly" in caplog.text
    with torch.no_grad():  # one image at a time, as the engine ran them (the branch depends on the batch)
        reference = [
            engine.model.classifier(engine.model.forward_features(prepare(im, RECIPE)[None]).mean((2, 3)))[0]
            for im in (dark, bright)
        ]
    np.testing.assert_allclose(np.stack([first.logits, second.logits]), torch.stack(reference).numpy(), atol=1e-5)


def test_features_are_the_models_post_relu_features_on_the_engines_path(engine: Engine) -> None:
    x = torch.stack([prepare(_image(i), RECIPE) for i in range(2)])
    features = engine.features(x)
    with torch.no_grad():
        expected = engine.model.forward_features(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert float(features.min()) >= 0.0

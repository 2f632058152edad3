"""The engine's one-pass CAM is Grad-CAM at the post-ReLU final features; at norm5 (pre-ReLU) Grad-CAM is another map.

For logits ``y_c = b_c + sum_k w_ck * mean_hw(A_k)`` with A = ReLU(Z) the post-ReLU features and Z norm5's output:

- at A: dy_c/dA_k(i,j) = w_ck / (h*w) everywhere, so Grad-CAM's weights are alpha_k = w_ck / (h*w) and its raw map
  sum_k alpha_k A_k = CAM_c / (h*w); pytorch-grad-cam then applies ReLU, min-max scaling and a resize. The engine's
  CAM, put through the same ReLU and the library's own scaling, must equal its output.
- at Z: dy_c/dZ_k(i,j) = w_ck / (h*w) * [Z_k(i,j) > 0], so alpha'_k = w_ck * p_k / (h*w) with p_k the fraction of
  positions where Z_k > 0, and the map is sum_k alpha'_k Z_k: negative pre-activations enter, channels are
  re-weighted by p_k. Not the CAM (DESIGN.md: "Hooking norm5, before the ReLU, is not the same map").

Tolerances: float32 arithmetic on a tiny DenseNet (Architecture.tiny(), random weights, 160-px input, 5x5 features):
raw maps and weights to 1e-5 relative to their largest magnitude; the [0, 1]-scaled output maps to 1e-5 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from model.engine import Engine, prepare
from model.localisation import upsample_cam
from model.network import Architecture, DenseNet
from model.types import PreprocessRecipe

RECIPE = PreprocessRecipe(input_size=160, resize=None)
SIZE = RECIPE.input_size


class _Hookable(nn.Module):
    """The same network with the final ReLU as a module, so a hook can sit on the post-ReLU features (chexd's
    DenseNet applies it functionally, as torchvision does)."""

    def __init__(self, net: DenseNet) -> None:
        super().__init__()
        self.features = net.features
        self.relu = nn.ReLU(inplace=False)  # not in place: norm5's hooked output must stay pre-ReLU
        self.classifier = net.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.relu(self.features(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: ~40 tiny forward/backward passes are 10-20x slower with 2 OpenMP threads on a busy
    2-core machine (barrier spinning), and one thread is what their size needs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup() -> tuple[Engine, _Hookable, np.ndarray, torch.Tensor]:
    torch.manual_seed(0)
    net = DenseNet(Architecture.tiny())
    with torch.no_grad():  # trained-looking BatchNorm statistics, so norm5's output has both signs in every channel
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.3)
        net.classifier.weight.normal_(0.0, 1.0)
        net.classifier.bias.normal_(0.0, 0.5)
    net.eval()
    engine = Engine(net, recipe=RECIPE, model_version="test", device="cpu")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = (0.5 + 0.25 * np.sin(7 * xx) * np.cos(5 * yy) + 0.1 * rng.random((SIZE, SIZE))).astype(np.float32)
    x = prepare(image, RECIPE)[None].contiguous()
    hookable = _Hookable(net).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hookable(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)
    return engine, hookable, image, x


@pytest.fixture(scope="module")
def post_relu(setup) -> list[tuple[np.ndarray, ...]]:
    """pytorch-grad-cam at the post-ReLU features, per class (see :func:`_grad_cam`)."""
    _, hookable, _, x = setup
    return [_grad_cam(hookable, hookable.relu, x, c) for c in range(hookable.classifier.out_features)]


def _grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, c: int) -> tuple[np.ndarray, ...]:
    """pytorch-grad-cam's output [H, W], its channel weights [C], the hooked activations [C, h, w], its raw map."""
    with GradCAM(model=model, target_layers=[layer]) as cam:
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        weights = cam.get_cam_weights(x, layer, None, acts, grads)
        raw = cam.get_cam_image(x, layer, None, acts, grads)
    return out[0], weights[0], acts[0], raw[0]


def _close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * float(np.abs(expected).max()))


def test_engine_cam_is_grad_cam_at_the_post_relu_features(setup, post_relu) -> None:
    engine, _, image, _ = setup
    (prediction,) = engine.predict([image])
    cams = prediction.cams.astype(np.float64)  # [14, h, w]
    h, w = cams.shape[1:]
    assert (h, w) == (SIZE // 32, SIZE // 32)
    weight = engine.weight.numpy().astype(np.float64)
    signs = []
    for c in range(cams.shape[0]):
        out, alpha, acts, raw = post_relu[c]
        assert acts.min() >= 0.0  # the hook really sees post-ReLU features
        _close(alpha, weight[c] / (h * w))  # alpha_k = w_ck / (h*w)
        _close(raw, cams[c] / (h * w))  # sum_k alpha_k A_k = CAM_c / (h*w)
        # grad-cam's output = its ReLU + scaling applied to our CAM (the 1/(h*w) factor kept for its 1e-7 epsilon)
        expected = scale_cam_image(scale_cam_image(np.maximum(cams[c] / (h * w), 0)[None], (SIZE, SIZE)))[0]
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
        # and, independently of the library's helpers: min-max of our own bilinear upsampling of ReLU(CAM). grad-cam
        # scales before resizing and again after; an interior cell centre falls between pixels, so the maximum
        # pixel is a hair below the cell value - hence 1e-2, not 1e-5.
        heat = upsample_cam(np.maximum(cams[c], 0), (SIZE, SIZE))
        if heat.max() > 0:
            heat = (heat - heat.min()) / (heat.max() - heat.min())
            np.testing.assert_allclose(out, heat, rtol=0, atol=1e-2)
        signs.append((cams[c] > 0).any() and (cams[c] < 0).any())
    assert sum(signs) >= 3  # the ReLU in Grad-CAM mattered: several maps have both signs


def test_grad_cam_at_norm5_before_the_relu_is_a_different_map(setup, post_relu) -> None:
    engine, hookable, image, x = setup
    (prediction,) = engine.predict([image])
    cams = prediction.cams.astype(np.float64)
    h, w = cams.shape[1:]
    weight = engine.weight.numpy().astype(np.float64)
    differences = []
    for c in range(cams.shape[0]):
        out5, alpha5, z, raw5 = _grad_cam(hookable, hookable.features.norm5, x, c)
        out = post_relu[c][0]
        assert z.min() < 0.0  # the hook sees pre-ReLU values
        positive = (z > 0).mean(axis=(1, 2))
        assert 0.0 < positive.mean() < 1.0
        _close(alpha5, weight[c] * positive / (h * w))  # alpha'_k = w_ck * p_k / (h*w)
        _close(raw5, np.einsum("k,kij->ij", weight[c] * positive / (h * w), z))  # sum_k alpha'_k Z_k
        if out.max() > 0 or out5.max() > 0:  # both all-zero when every logit contribution is negative: no map
            differences.append(float(np.abs(out5 - out).max()))
    differences = np.array(differences)
    # wherever there is a map, the two [0, 1]-scaled maps disagree by more than a tenth of the range
    assert len(differences) >= 8 and differences.min() > 0.1, differences
    assert differences.max() > 0.5, differences

"""Batched inference: probabilities, all 14 class activation maps and per-channel evidence from one forward pass.

For a DenseNet-family model with post-ReLU final features ``A`` [C, h, w] and a linear head (W [n, C], b [n]):

- ``logit_c = b_c + sum_k W_ck * mean(A_k)`` (global average pooling is linear),
- ``CAM_c = sum_k W_ck * A_k`` — at the post-ReLU features Grad-CAM equals CAM, so no backward pass is needed,
- ``phi_ck = W_ck * mean(A_k)`` — channel k's exact contribution to logit c; ``sum_k phi_ck + b_c = logit_c``.

CPU path: fp32, channels_last, ``torch.inference_mode``, the feature extractor traced and frozen with TorchScript once
per input shape (BatchNorm after a convolution folded into it, constants inlined). The graph is checked against the
eager model on its first batch, that batch negated and a batch of another size; the eager model runs whenever
tracing fails or disagrees.
CUDA path: bf16 autocast, channels_last, one CUDA graph per fixed batch size (inputs padded up to the next captured
size). The head is always computed in fp32.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.applicability import ApplicabilityModel
from model.errors import ModelError
from model.types import LABELS, Prediction, PreprocessRecipe

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 64


class InputError(ModelError, ValueError):
    """An image the engine refuses: wrong shape or dtype, NaN, constant, or smaller than 64 px."""


def check_image(image: np.ndarray, index: int = 0) -> np.ndarray:
    """Validate one decoded image: 2-D float array in [0, 1], at least 64 px a side, finite, not constant."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image {index}: expected a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise InputError(f"image {index}: expected a 2-D grey image [rows, columns], got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise InputError(f"image {index}: expected floats in [0, 1], got dtype {image.dtype}")
    if min(image.shape) < MIN_SIDE:
        raise InputError(f"image {index}: {image.shape[0]}x{image.shape[1]} px is smaller than {MIN_SIDE} px")
    if not np.all(np.isfinite(image)):
        raise InputError(f"image {index}: contains NaN or infinite values")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"image {index}: values in [{lo:.3g}, {hi:.3g}] - expected [0, 1]")
    if hi - lo < 1e-6:
        raise InputError(f"image {index}: constant image (every pixel {lo:.3g})")
    return image.astype(np.float32, copy=False)


def prepare(image: np.ndarray, recipe: PreprocessRecipe) -> torch.Tensor:
    """One image in [0, 1] -> network input [channels, input_size, input_size] following ``recipe``.

    A non-square image is first padded to a square with 0 (air), so no anatomy is cropped or distorted; for the
    square images CheXNet was trained on this is the identity."""
    x = torch.from_numpy(np.ascontiguousarray(check_image(image)))[None, None]
    rows, cols = x.shape[-2:]
    if rows != cols:
        pad_rows, pad_cols = max(rows, cols) - rows, max(rows, cols) - cols
        x = F.pad(x, (pad_cols // 2, pad_cols - pad_cols // 2, pad_rows // 2, pad_rows - pad_rows // 2))
    side = recipe.resize or recipe.input_size
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    if side > recipe.input_size:
        top = (side - recipe.input_size) // 2
        x = x[..., top : top + recipe.input_size, top : top + recipe.input_size]
    x = x[0].clamp_(0.0, 1.0)
    if recipe.normalization == "xrv":
        x = x * 2048.0 - 1024.0
    if recipe.channels == 3:
        x = x.expand(3, -1, -1)
        if recipe.normalization == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            x = (x - mean) / std
    elif recipe.normalization == "imagenet":
        x = (x - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    return x.contiguous()


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA when available. Raises ModelError for an unavailable explicit choice."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA GPU is available")
    return device


def freeze(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``module`` (switched to eval mode) traced on ``example`` and frozen by TorchScript: parameters become
    constants, a BatchNorm after a convolution is folded into it. The graph is only valid for the control flow taken
    on ``example``. Raises what ``torch.jit.trace``/``freeze`` raise for a module they cannot handle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, constant per shape
        return torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))


class _FeatureExtractor(nn.Module):
    """``model.forward_features`` as a module's ``forward``, the method TorchScript traces and freezes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadOutputs:
    """Raw batched outputs (fp32 tensors on CPU): logits [B, n], cams [B, n, h, w], pooled [B, C]."""

    logits: torch.Tensor
    cams: torch.Tensor
    pooled: torch.Tensor


class Engine:
    """Runs a model with ``forward_features(x) -> post-ReLU features [B, C, h, w]`` and ``classifier: nn.Linear``.

    ``predict(images)`` validates, preprocesses and batches (``batch_size``) the images and returns one Prediction
    per image in order. Thread-safe: calls are serialised. ``freeze=False`` keeps the CPU path eager (see the module
    doc); the model must not be changed after the engine is built. ``applicability`` (the artifact's, e.g.
    ``manifest.applicability``): each Prediction then carries its out-of-domain verdict, scored on the pooled
    features of the same forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        recipe: PreprocessRecipe,
        labels: Sequence[str] = LABELS,
        model_version: str,
        device: str = "auto",
        batch_size: int = 16,
        top_k: int = 10,
        cuda_graph_batch_sizes: Sequence[int] = (1, 8, 32),
        freeze: bool = True,
        applicability: ApplicabilityModel | None = None,
    ) -> None:
        head = getattr(model, "classifier", None)
        if not isinstance(head, nn.Linear) or not hasattr(model, "forward_features"):
            raise ModelError("the engine needs a model with forward_features() and a linear 'classifier' head")
        if head.out_features != len(labels):
            raise ModelError(f"model has {head.out_features} outputs but {len(labels)} labels")
        if batch_size < 1 or top_k < 1:
            raise ValueError(f"Invalid batch_size {batch_size} or top_k {top_k} - must be >= 1")
        self.labels = tuple(labels)
        self.recipe = recipe
        self.model_version = model_version
        if applicability is not None and applicability.channels != head.in_features:
            raise ModelError(
                f"the applicability model was fitted on {applicability.channels} feature channels but the model has "
                f"{head.in_features}"
            )
        self.applicability = applicability
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.top_k = min(top_k, head.in_features)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.weight = head.weight.detach().float().to(self.device)  # [n, C]
        self.bias = head.bias.detach().float().to(self.device) if head.bias is not None else None
        self._lock = threading.Lock()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._graph_sizes = sorted(set(cuda_graph_batch_sizes)) if self.device.type == "cuda" else []
        self._freeze = freeze
        self._frozen: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]] = {}

    # --- forward -------------------------------------------------------------------------------------------------

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return self._features_cuda(x)
        if not self._freeze:
            return self.model.forward_features(x)
        shape = tuple(x.shape[1:])
        if shape not in self._frozen:
            self._frozen[shape] = self._trace(x)
        return self._frozen[shape](x)

    def _trace(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward_features`` as a frozen TorchScript graph for inputs shaped like ``x`` (any batch size); the eager
        method when the model cannot be traced or the graph's output on ``x``, ``-x`` or a batch of another size
        differs from the eager one (data-dependent control flow or a batch size the trace baked in)."""
        eager = self.model.forward_features
        try:
            graph = freeze(_FeatureExtractor(self.model), x)
            other_batch = x[:1] if len(x) > 1 else torch.cat([x, -x])  # a trace may bake in the batch size
            checks = [(eager(probe), graph(probe)) for probe in (x, -x, other_batch)]
        except Exception as exc:  # noqa: BLE001 - any tracing failure only costs speed
            log.warning("running the model eagerly: TorchScript tracing failed (%s: %s)", type(exc).__name__, exc)
            return eager
        for expected, got in checks:
            scale = 1.0 + float(expected.abs().max())
            if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-4 * scale:
                log.warning("running the model eagerly: its frozen TorchScript graph disagrees with the eager model")
                return eager
        log.info("froze the model's feature extractor for inputs %s", tuple(x.shape[1:]))
        return graph

    def _features_cuda(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = next((s for s in self._graph_sizes if s >= n), None)
        if size is None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model.forward_features(x).float()
        if size not in self._graphs:
            self._graphs[size] = self._capture(size, x.shape[1:])
        graph, static_in, static_out = self._graphs[size]
        static_in.zero_()
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n].float()

    def _capture(self, size: int, shape: torch.Size) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = torch.zeros((size, *shape), device=self.device).contiguous(memory_format=torch.channels_last)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):  # warm-up outside the graph, as CUDA graph capture requires
                self.model.forward_features(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.autocast("cuda", dtype=torch.bfloat16):
            static_out = self.model.forward_features(static_in)
        log.info("captured CUDA graph for batch size %d", size)
        return graph, static_in, static_out

    def head(self, features: torch.Tensor) -> HeadOutputs:
        """Logits, CAMs and pooled features from post-ReLU features [B, C, h, w], in fp32."""
        features = features.float()
        pooled = features.mean(dim=(2, 3))  # [B, C]
        logits = pooled @ self.weight.T
        if self.bias is not None:
            logits = logits + self.bias
        cams = torch.einsum("nc,bchw->bnhw", self.weight, features)
        return HeadOutputs(logits=logits.cpu(), cams=cams.cpu(), pooled=pooled.cpu())

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Post-ReLU final features [B, C, h, w] of a prepared batch on the engine's path (frozen graph on the CPU,
        bf16 CUDA graph on a GPU), on the engine's device; no head."""
        return self._features(batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> HeadOutputs:
        """Batch [B, channels, S, S] (already prepared) -> HeadOutputs."""
        x = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.head(self._features(x))

    # --- public ---------------------------------------------------------------------------------------------------

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """One Prediction per image (decoded, [0, 1], bright = dense). Raises InputError naming the bad image."""
        tensors = [prepare(image, self.recipe) for image in images]
        predictions: list[Prediction] = []
        with self._lock:
            for start in range(0, len(tensors), self.batch_size):
                out = self.forward(torch.stack(tensors[start : start + self.batch_size]))
                predictions.extend(self.to_predictions(out))
        return predictions

    def to_predictions(self, out: HeadOutputs) -> list[Prediction]:
        """HeadOutputs of a batch -> one Prediction per image (top-k channel evidence, probabilities), on the CPU.
        Raises ModelError for non-finite logits. ``predict`` = prepare + ``forward`` + this."""
        weight = self.weight.cpu()
        bias = self.bias.cpu() if self.bias is not None else torch.zeros(weight.shape[0])
        contributions = out.pooled[:, None, :] * weight[None]  # [B, n, C]
        top = contributions.abs().topk(self.top_k, dim=2).indices
        top_values = contributions.gather(2, top)
        totals = contributions.abs().sum(dim=2).numpy().astype(np.float32)  # [B, n]: sum_k |phi_ck|
        probabilities = torch.sigmoid(out.logits)
        if not torch.all(torch.isfinite(out.logits)):
            raise ModelError("the model produced non-finite logits")
        n = out.logits.shape[0]
        verdicts = self.applicability.judge_many(out.pooled.numpy()) if self.applicability is not None else [None] * n
        return [
            Prediction(
                labels=self.labels,
                probabilities=probabilities[i].numpy().astype(np.float32),
                logits=out.logits[i].numpy().astype(np.float32),
                cams=out.cams[i].numpy().astype(np.float32),
                top_channels=top[i].numpy().astype(np.int32),
                top_contributions=top_values[i].numpy().astype(np.float32),
                bias=bias.numpy().astype(np.float32),
                model_version=self.model_version,
                applicability=verdicts[i],
                evidence_total=totals[i],
            )
            for i in range(n)
        ]

    def contributions(self, image: np.ndarray) -> np.ndarray:
        """All channel contributions phi [n, C] for one image (for evidence analysis and tests)."""
        with self._lock:
            out = self.forward(prepare(image, self.recipe)[None])
        return (out.pooled[0][None, :] * self.weight.cpu()).numpy()

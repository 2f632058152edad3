"""The DenseNet family of CheXNet, built from explicit per-layer channel counts.

:class:`Architecture` is a plain, JSON-able description of the network's channel counts; it lives in the torch-free
:mod:`model.architecture` (so manifests can be read without torch) and is re-exported here with :class:`LayerSpec` and
:class:`TransitionSpec`.

:class:`DenseNet` builds the network. Its module names are torchvision's (``features.denseblock1.denselayer1.conv1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``), so a torchvision state dict loads with
``strict=True``. ``forward`` returns logits (no sigmoid); ``forward_features`` returns the post-ReLU final feature
maps, and ``logits == classifier(mean_hw(forward_features(x)))``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.architecture import Architecture, LayerSpec, TransitionSpec

__all__ = ["Architecture", "DenseNet", "LayerSpec", "TransitionSpec"]


# --------------------------------------------------------------------------------------------------- torch modules
def _index_buffer(module: nn.Module, indices: tuple[int, ...] | None) -> None:
    # Non-persistent: moves with .to(device) but stays out of the state dict (keys stay torchvision's).
    value = None if indices is None else torch.tensor(indices, dtype=torch.long)
    module.register_buffer("kept_inputs", value, persistent=False)


def _gather(x: Tensor, indices: Tensor) -> Tensor:
    """Channels ``indices`` of ``x`` [B, C, H, W], in ``x``'s memory format. On a channels-last tensor a plain
    ``index_select`` along dim 1 returns NCHW, and every op after it then converts back (a copy per layer); gathering
    along the last dim of the NHWC view keeps channels-last at the same cost."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).index_select(3, indices).permute(0, 3, 1, 2)
    return x.index_select(1, indices)


class _DenseLayer(nn.Module):
    kept_inputs: Tensor | None

    def __init__(self, n_in: int, spec: LayerSpec) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(n_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(n_in, spec.bottleneck, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(spec.bottleneck)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(spec.bottleneck, spec.growth, kernel_size=3, stride=1, padding=1, bias=False)
        _index_buffer(self, spec.kept_inputs)

    def forward(self, x: Tensor) -> Tensor:
        if self.kept_inputs is not None:
            x = _gather(x, self.kept_inputs)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, arch: Architecture, block: int) -> None:
        super().__init__()
        for i, spec in enumerate(arch.blocks[block]):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(arch.layer_inputs(block, i), spec))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            concatenated = features[0] if len(features) == 1 else torch.cat(features, 1)
            features.append(layer(concatenated))
        return torch.cat(features, 1)


class _Transition(nn.Module):
    kept_inputs: Tensor | None

    def __init__(self, n_in: int, spec: TransitionSpec, *, pool_first: bool = False) -> None:
        super().__init__()
        self.pool_first = pool_first
        self.norm = nn.BatchNorm2d(n_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(n_in, spec.out_channels, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        _index_buffer(self, spec.kept_inputs)

    def forward(self, x: Tensor) -> Tensor:
        if self.kept_inputs is not None:
            x = _gather(x, self.kept_inputs)
        x = self.relu(self.norm(x))
        return self.conv(self.pool(x)) if self.pool_first else self.pool(self.conv(x))


class _Select(nn.Module):
    """Gathers the head's channels before ``norm5`` (no parameters)."""

    kept_inputs: Tensor

    def __init__(self, indices: tuple[int, ...]) -> None:
        super().__init__()
        _index_buffer(self, indices)

    def forward(self, x: Tensor) -> Tensor:
        return _gather(x, self.kept_inputs)


class DenseNet(nn.Module):
    """A DenseNet built from an :class:`Architecture`, with torchvision's module names.

    Input: float32 ``[B, in_channels, H, W]`` (H, W >= 32; the final features are ``[H/32, W/32]`` for four blocks).
    ``forward`` returns logits ``[B, num_classes]`` (apply a sigmoid for probabilities). Only the non-checkpointed
    (``memory_efficient=False``) forward exists. Weights are initialised as torchvision does.
    """

    def __init__(self, architecture: Architecture) -> None:
        super().__init__()
        arch = architecture
        self.architecture = arch
        modules: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(arch.in_channels, arch.stem_channels, kernel_size=7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(arch.stem_channels),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        for b in range(len(arch.blocks)):
            modules[f"denseblock{b + 1}"] = _DenseBlock(arch, b)
            if b < len(arch.transitions):
                modules[f"transition{b + 1}"] = _Transition(
                    arch.transition_inputs(b), arch.transitions[b], pool_first=arch.pool_first
                )
        if arch.head_inputs is not None:
            modules["select5"] = _Select(arch.head_inputs)
        modules["norm5"] = nn.BatchNorm2d(arch.feature_channels)
        self.features = nn.Sequential(modules)
        self.classifier = nn.Linear(arch.feature_channels, arch.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.architecture.in_channels:
            raise ValueError(
                f"Invalid input shape {tuple(x.shape)} - expected [batch, {self.architecture.in_channels}, H, W]"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """Post-ReLU final feature maps ``[B, C, H/32, W/32]``, C = ``architecture.feature_channels``."""
        self._check_input(x)
        return F.relu(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` = classifier(spatial mean of :meth:`forward_features`)."""
        pooled = torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), (1, 1)), 1)
        return self.classifier(pooled)

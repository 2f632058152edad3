"""Small networks for tests: random-weight tiny DenseNets (chexd's own and torchvision's), input batches, a one-thread
torch context, and the tiny model artifact the suite's daemons run by default (tests/conftest.py ``tiny_model``).

Shared by unit and integration tests (test modules import this module, never each other).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn

from model.artifact import save_artifact
from model.network import Architecture, DenseNet
from model.types import PreprocessRecipe

# torchvision's DenseNet constructor arguments for the same toy shape as Architecture.tiny()
TORCHVISION_TINY = {"growth_rate": 4, "block_config": (2, 2, 2, 2), "num_init_features": 8, "bn_size": 2}
TINY_RECIPE = PreprocessRecipe(input_size=64, resize=None)
TINY_USE = "synthetic demo model, not for diagnosis (test fixture)"


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (a fresh net's BN is near identity, which hides mistakes); the model
    in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen) * (2 / module.weight[0].numel()) ** 0.5
                )
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


def tiny(seed: int = 0, arch: Architecture | None = None) -> DenseNet:
    """A randomized :meth:`Architecture.tiny` DenseNet (or ``arch``), 14 outputs."""
    return randomize(DenseNet(arch or Architecture.tiny()), seed)  # type: ignore[return-value]


def torchvision_tiny(num_classes: int = 14, seed: int = 0) -> nn.Module:
    """torchvision's DenseNet class in the tiny shape, randomized (the key layout of foreign checkpoints)."""
    return randomize(torchvision.models.DenseNet(**TORCHVISION_TINY, num_classes=num_classes), seed)


def image(batch: int = 2, channels: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    """A (batch, channels, size, size) float batch of standard-normal values."""
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these networks are tiny, and on a busy 2-core machine two OpenMP threads were
    measured 50-100x slower than one (threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_tiny_artifact(folder: Path, *, seed: int = 3, name: str = "tiny-test-model", dtype: str = "float32") -> Path:
    """A chexd artifact of :func:`tiny` (64 px input, synthetic) in ``folder``; returns its manifest path.

    Loads in milliseconds where the bundled demo DenseNet121 takes a second and more per image on a busy CPU; its
    findings are random, so tests that assert what the model finds run the demo (``make_daemon(model="demo")``)."""
    return save_artifact(tiny(seed=seed), folder, name=name, preprocessing=TINY_RECIPE, intended_use=TINY_USE,
                         synthetic=True, dtype=dtype)

"""Parameter and MAC counts: a hand count on the tiny DenseNet, torch's FLOP counter, and torchvision's densenet121."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from model.complexity import complexity, count_macs, feature_size, time_forward
from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec


def _counted_macs(module: torch.nn.Module, size: int, channels: int = 3) -> int:
    """MACs of conv + linear as torch's own FLOP counter sees them (it reports 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module.eval()(torch.zeros(1, channels, size, size))
    return counter.get_total_flops() // 2


def test_tiny_hand_count_at_64_px() -> None:
    # Tiny: stem 8, 2 layers per block, growth 4, bottleneck 8, transitions halve the channels (16 -> 8).
    # 64 px: conv0 -> 32, pool0 -> 16; blocks at 16, 8, 4, 2 px.
    stem = 3 * 8 * 7 * 7 * 32 * 32
    per_block_conv1 = (8 + 12) * 8  # layer inputs 8 and 12 channels, 8 bottleneck channels each
    per_block_conv2 = 2 * 8 * 4 * 9
    transition = 16 * 8
    areas = [16 * 16, 8 * 8, 4 * 4, 2 * 2]
    expected = (
        stem
        + sum((per_block_conv1 + per_block_conv2) * a for a in areas)
        + sum(transition * a for a in areas[:3])
        + 16 * 14
    )
    result = complexity(Architecture.tiny(), 64)
    assert result.macs == expected
    assert sum(result.macs_by_part.values()) == result.macs
    assert result.macs_by_part["stem"] == stem
    assert result.parameters == Architecture.tiny().parameters()
    assert feature_size(Architecture.tiny(), 64) == [16, 8, 4, 2]


def test_counts_match_torch_flop_counter_on_a_pruned_tiny_net() -> None:
    base = Architecture.tiny()
    blocks = [list(block) for block in base.blocks]
    blocks[0][1] = LayerSpec(bottleneck=5, growth=3, kept_inputs=(0, 2, 5, 9))
    blocks[2][0] = LayerSpec(bottleneck=6, growth=4, kept_inputs=(1, 3, 4))
    transitions = list(base.transitions)
    transitions[1] = TransitionSpec(out_channels=7, kept_inputs=(0, 1, 2, 10, 15))
    arch = Architecture(
        stem_channels=8,
        blocks=tuple(tuple(b) for b in blocks),
        transitions=tuple(transitions),
        head_inputs=(0, 4, 7, 9, 11),
    )
    for variant in (arch, dataclasses.replace(arch, pool_first=True)):
        net = DenseNet(variant)
        for size in (64, 96, 100):
            assert count_macs(variant, size) == _counted_macs(net, size)
        assert complexity(variant, 64).parameters == sum(p.numel() for p in net.parameters())
    pooled, plain = complexity(dataclasses.replace(arch, pool_first=True), 64), complexity(arch, 64)
    assert pooled.macs_by_part["transition"] * 4 == plain.macs_by_part["transition"]  # 16 -> 8 -> 4 px, all even


def test_densenet121_matches_torchvision() -> None:
    arch = Architecture.densenet121()
    result = complexity(arch, 224)
    reference = torchvision.models.densenet121(num_classes=14)
    assert result.parameters == 6_968_206 == sum(p.numel() for p in reference.parameters())
    assert result.macs == _counted_macs(reference, 224)
    # torchvision documents 2.834 GFLOPS (= conv + linear GMACs) with the 1000-class head (1024*986 more MACs).
    assert round((result.macs + 1024 * (1000 - 14)) / 1e9, 3) == 2.834


@pytest.mark.parametrize("size", [0, -3, 15])
def test_too_small_or_invalid_input_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="input_size"):
        complexity(Architecture.tiny(), size)


@pytest.mark.parametrize("frozen", [False, True])
def test_time_forward_gives_one_median_per_model_and_leaves_the_models_usable(frozen: bool) -> None:
    models = [DenseNet(Architecture.tiny()), DenseNet(dataclasses.replace(Architecture.tiny(), pool_first=True))]
    times = time_forward(models, input_size=64, batch_size=2, repeats=3, warmup=1, frozen=frozen)
    assert len(times) == 2 and all(0 < t < 10 for t in times)
    with torch.inference_mode():
        assert models[0](torch.zeros(1, 3, 64, 64)).shape == (1, 14)  # still an eager nn.Module
    with pytest.raises(ValueError, match="repeats"):
        time_forward(models, input_size=64, batch_size=1, repeats=0)

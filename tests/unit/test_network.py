"""model.network: the DenseNet family from explicit channel counts, exact against torchvision's densenet121."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision

from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec
from tests.nets import image, randomize, tiny


def test_densenet121_has_the_papers_parameter_count() -> None:
    arch = Architecture.densenet121()
    model = DenseNet(arch)
    assert arch.parameters() == 6_968_206
    assert sum(p.numel() for p in model.parameters()) == 6_968_206
    assert sum(p.numel() for p in model.classifier.parameters()) == 14_350
    assert arch.feature_channels == 1024
    assert [len(b) for b in arch.blocks] == [6, 12, 24, 16]
    assert [t.out_channels for t in arch.transitions] == [128, 256, 512]
    assert [arch.block_output(b) for b in range(4)] == [256, 512, 1024, 1024]


def test_torchvision_densenet121_state_dict_loads_strict_and_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    reference = randomize(torchvision.models.densenet121(weights=None, num_classes=14), seed=3)
    model = DenseNet(Architecture.densenet121())
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval()
    x = image(batch=2, size=96)
    with torch.inference_mode():
        expected = reference(x)
        logits = model(x)
        features = model.forward_features(x)
        reference_features = torch.relu(reference.features(x))
    assert logits.shape == (2, 14)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(features, reference_features, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == list(reference.state_dict())  # same names, same order


def test_tiny_forward_shapes_and_parameter_count() -> None:
    arch = Architecture.tiny()
    model = tiny()
    with torch.inference_mode():
        assert model(image(batch=3)).shape == (3, 14)
        assert model.forward_features(image(batch=3)).shape == (3, arch.feature_channels, 2, 2)
    assert sum(p.numel() for p in model.parameters()) == arch.parameters()
    mono = DenseNet(Architecture.tiny(in_channels=1, num_classes=5)).eval()
    with torch.inference_mode():
        assert mono(image(batch=1, channels=1, size=32)).shape == (1, 5)


def test_logits_are_the_classifier_over_the_mean_of_post_relu_features() -> None:
    model = tiny(seed=4)
    x = image(batch=4, size=96)
    with torch.inference_mode():
        features = model.forward_features(x)
        logits = model(x)
    assert features.min() >= 0  # post-ReLU
    torch.testing.assert_close(logits, model.classifier(features.mean(dim=(2, 3))), atol=1e-5, rtol=0)


def test_input_with_the_wrong_channel_count_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Invalid input shape \(1, 1, 64, 64\) - expected \[batch, 3, H, W\]"):
        tiny()(image(batch=1, channels=1))


def all_kept(arch: Architecture) -> Architecture:
    """The same net with every kept_inputs spelled out as all channels."""
    blocks = tuple(
        tuple(
            LayerSpec(
                bottleneck=layer.bottleneck, growth=layer.growth, kept_inputs=tuple(range(arch.layer_available(b, i)))
            )
            for i, layer in enumerate(block)
        )
        for b, block in enumerate(arch.blocks)
    )
    transitions = tuple(
        TransitionSpec(out_channels=t.out_channels, kept_inputs=tuple(range(arch.block_output(b))))
        for b, t in enumerate(arch.transitions)
    )
    return Architecture(
        in_channels=arch.in_channels,
        stem_channels=arch.stem_channels,
        blocks=blocks,
        transitions=transitions,
        head_inputs=tuple(range(arch.feature_channels)),
        num_classes=arch.num_classes,
    )


def test_kept_inputs_equal_to_all_channels_is_the_plain_net() -> None:
    plain = tiny(seed=5)
    spelled = DenseNet(all_kept(plain.architecture))
    spelled.load_state_dict(plain.state_dict(), strict=True)
    spelled.eval()
    x = image(size=64)
    with torch.inference_mode():
        assert torch.equal(spelled(x), plain(x))
    assert set(dict(spelled.named_buffers())) - set(spelled.state_dict()), "index buffers stay out of the state dict"


def drop_channel(arch: Architecture, where: str, channel: int) -> Architecture:
    data = arch.to_dict()
    if where == "layer":  # block 1, layer 2: reads 8 stem + 4 layer-1 channels
        data["blocks"][0][1]["kept_inputs"] = [c for c in range(arch.layer_available(0, 1)) if c != channel]
    elif where == "transition":
        data["transitions"][1]["kept_inputs"] = [c for c in range(arch.block_output(1)) if c != channel]
    else:
        data["head_inputs"] = [c for c in range(arch.feature_channels) if c != channel]
    return Architecture.from_dict(data)


@pytest.mark.parametrize(
    ("where", "channel", "norm", "conv"),
    [
        ("layer", 9, "features.denseblock1.denselayer2.norm1", "features.denseblock1.denselayer2.conv1.weight"),
        ("transition", 3, "features.transition2.norm", "features.transition2.conv.weight"),
        ("head", 11, "features.norm5", "classifier.weight"),
    ],
)
def test_dropping_an_input_channel_equals_zeroing_it_in_the_consumer(
    where: str, channel: int, norm: str, conv: str
) -> None:
    plain = tiny(seed=6)
    pruned_arch = drop_channel(plain.architecture, where, channel)
    state = plain.state_dict()
    n_in = state[conv].shape[1]
    kept = torch.tensor([c for c in range(n_in) if c != channel])
    pruned_state = dict(state)
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        pruned_state[f"{norm}.{suffix}"] = state[f"{norm}.{suffix}"][kept]
    pruned_state[conv] = state[conv][:, kept]
    pruned = DenseNet(pruned_arch)
    pruned.load_state_dict(pruned_state, strict=True)
    pruned.eval()
    zeroed = tiny(seed=6)
    with torch.no_grad():
        zeroed.state_dict()[conv][:, channel] = 0
    x = image(size=64)
    with torch.inference_mode():
        assert not torch.allclose(zeroed(x), plain(x))  # the channel mattered
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-6, rtol=0)
    assert (
        pruned_arch.parameters()
        == plain.architecture.parameters() - {"layer": 2 + 8, "transition": 2 + 8, "head": 2 + 14}[where]
    )
    assert sum(p.numel() for p in pruned.parameters()) == pruned_arch.parameters()


def test_pooling_first_in_the_transitions_changes_no_weight_and_no_output() -> None:
    plain = tiny(seed=3, arch=drop_channel(Architecture.tiny(), "transition", 2))
    reordered = DenseNet(dataclasses.replace(plain.architecture, pool_first=True)).eval()
    reordered.load_state_dict(plain.state_dict(), strict=True)
    x = image(size=72)  # odd-sized maps before the second transition: pooling drops the same row either way
    with torch.inference_mode():
        torch.testing.assert_close(reordered(x), plain(x), rtol=1e-5, atol=1e-5)
    assert reordered.architecture.parameters() == plain.architecture.parameters()


def test_architectures_written_before_pool_first_existed_keep_their_json() -> None:
    arch = Architecture.tiny()
    assert "pool_first" not in arch.to_dict()  # manifests, and their content hashes, unchanged
    assert Architecture.from_dict(dataclasses.replace(arch, pool_first=True).to_dict()).pool_first


def test_architecture_round_trips_through_json() -> None:
    for arch in (
        Architecture.densenet121(),
        Architecture.tiny(in_channels=1),
        drop_channel(Architecture.tiny(), "head", 2),
        dataclasses.replace(Architecture.tiny(), pool_first=True),
    ):
        data = json.loads(json.dumps(arch.to_dict()))
        assert Architecture.from_dict(data) == arch
        assert Architecture.from_dict(data).parameters() == arch.parameters()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(num_classes=0), "Invalid num_classes 0"),
        (lambda d: d.update(pool_first="yes"), "Invalid pool_first 'yes'"),
        (lambda d: d.update(stem_channels=-8), "Invalid stem_channels -8"),
        (lambda d: d["blocks"][0][0].update(growth=0), "Invalid growth 0"),
        (lambda d: d["blocks"][1].clear(), "denseblock2: a dense block needs at least one layer"),
        (lambda d: d["transitions"].pop(), "3 blocks|expected 3"),
        (lambda d: d["blocks"][0][1].update(kept_inputs=[0, 12]), r"denseblock1.denselayer2: indices must be in 0..11"),
        (lambda d: d["blocks"][0][1].update(kept_inputs=[3, 1]), "strictly increasing"),
        (lambda d: d["transitions"][0].update(kept_inputs=[]), "transition1: empty"),
        (lambda d: d.update(head_inputs=[99]), "the head"),
        (lambda d: d.update(depth=121), r"unknown keys \['depth'\]"),
    ],
)
def test_invalid_architectures_are_refused_with_the_rule(change, message: str) -> None:  # type: ignore[no-untyped-def]
    data = Architecture.tiny().to_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        Architecture.from_dict(data)


def test_a_channels_last_input_stays_channels_last_through_the_kept_input_gathers() -> None:
    net = tiny(seed=4, arch=drop_channel(drop_channel(Architecture.tiny(), "layer", 1), "head", 2))
    x = image(size=64)
    with torch.inference_mode():
        plain = net(x)
        net.to(memory_format=torch.channels_last)
        features = net.features(x.contiguous(memory_format=torch.channels_last))
        logits = net(x.contiguous(memory_format=torch.channels_last))
    assert features.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)

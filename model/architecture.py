"""The DenseNet family as plain, JSON-able channel counts: :class:`Architecture`, :class:`LayerSpec`,
:class:`TransitionSpec` (no torch).

``Architecture`` is the stem width, every dense layer's bottleneck and growth channels, every transition's output
channels, and optionally the subset of concatenated input channels each consumer reads (``kept_inputs`` /
``head_inputs``). ``Architecture.densenet121()`` is torchvision's ``densenet121`` with a 14-output head (6,968,206
parameters); a compressed model is simply an Architecture with smaller numbers. :mod:`model.network` builds the torch
network from it (and re-exports these names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Architecture", "LayerSpec", "TransitionSpec"]


def _as_indices(value: Sequence[int] | None, available: int, where: str) -> tuple[int, ...] | None:
    """Validate a channel subset: non-empty, strictly increasing ints in [0, available)."""
    if value is None:
        return None
    indices = tuple(value)
    if not indices:
        raise ValueError(f"Invalid kept inputs of {where}: empty - keep at least one channel (or None for all)")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"Invalid kept inputs of {where}: {i!r} is not an integer channel index")
    if any(b <= a for a, b in zip(indices, indices[1:], strict=False)):
        raise ValueError(f"Invalid kept inputs of {where}: indices must be strictly increasing")
    if indices[0] < 0 or indices[-1] >= available:
        raise ValueError(
            f"Invalid kept inputs of {where}: indices must be in 0..{available - 1} "
            f"(the layer's {available} concatenated input channels), got {indices[0]}..{indices[-1]}"
        )
    return indices


def _positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} {value!r} - must be a positive integer")


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerSpec:
    """One dense layer: BN-ReLU-conv1x1 to ``bottleneck`` channels, BN-ReLU-conv3x3 to ``growth`` channels.

    ``kept_inputs``: indices into the layer's concatenated input (block input first, then earlier layers' outputs in
    order) that it reads; None reads all of them.
    """

    bottleneck: int
    growth: int
    kept_inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self.bottleneck, "bottleneck")
        _positive(self.growth, "growth")
        if self.kept_inputs is not None:
            object.__setattr__(self, "kept_inputs", tuple(self.kept_inputs))

    def to_dict(self) -> dict[str, Any]:
        kept = None if self.kept_inputs is None else list(self.kept_inputs)
        return {"bottleneck": self.bottleneck, "growth": self.growth, "kept_inputs": kept}


@dataclass(frozen=True, kw_only=True, slots=True)
class TransitionSpec:
    """A transition: BN-ReLU-conv1x1 to ``out_channels``, then 2x2 average pooling.

    ``kept_inputs``: indices into the preceding block's output channels that it reads; None reads all.
    """

    out_channels: int
    kept_inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _positive(self.out_channels, "transition out_channels")
        if self.kept_inputs is not None:
            object.__setattr__(self, "kept_inputs", tuple(self.kept_inputs))

    def to_dict(self) -> dict[str, Any]:
        kept = None if self.kept_inputs is None else list(self.kept_inputs)
        return {"out_channels": self.out_channels, "kept_inputs": kept}


def _layer_from(value: LayerSpec | Mapping[str, Any]) -> LayerSpec:
    if isinstance(value, LayerSpec):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"Invalid layer {value!r} - expected a mapping with bottleneck, growth, kept_inputs")
    unknown = set(value) - {"bottleneck", "growth", "kept_inputs"}
    if unknown:
        raise ValueError(f"Invalid layer: unknown keys {sorted(unknown)}")
    return LayerSpec(**value)


def _transition_from(value: TransitionSpec | Mapping[str, Any]) -> TransitionSpec:
    if isinstance(value, TransitionSpec):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"Invalid transition {value!r} - expected a mapping with out_channels, kept_inputs")
    unknown = set(value) - {"out_channels", "kept_inputs"}
    if unknown:
        raise ValueError(f"Invalid transition: unknown keys {sorted(unknown)}")
    return TransitionSpec(**value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Architecture:
    """A DenseNet as explicit channel counts.

    - ``in_channels``: image channels (3 for CheXNet/torchvision, 1 for torchxrayvision).
    - ``stem_channels``: output channels of the 7x7 stride-2 ``conv0`` (64 in DenseNet121).
    - ``blocks``: per dense block, its layers (:class:`LayerSpec`). Block b's input is the stem (b = 0) or the
      preceding transition's output; its output is the input concatenated with every layer's ``growth`` channels.
    - ``transitions``: one :class:`TransitionSpec` between consecutive blocks (``len(blocks) - 1``).
    - ``head_inputs``: which of the last block's output channels reach ``norm5`` and the classifier (None: all).
    - ``num_classes``: outputs of the linear head.
    - ``pool_first``: transitions average-pool before their 1x1 conv instead of after (torchvision's order). The
      output is the same (both are linear: the conv mixes channels at each pixel, the pooling averages pixels within
      each channel, so they commute; equal up to float rounding), at a quarter of the transition conv's MACs.

    Spatial size is divided by 4 in the stem and by 2 in each transition (32 for four blocks).
    Raises ValueError for a non-positive count or a channel index outside the channels a consumer can read.
    """

    in_channels: int = 3
    stem_channels: int = 64
    blocks: tuple[tuple[LayerSpec, ...], ...]
    transitions: tuple[TransitionSpec, ...]
    head_inputs: tuple[int, ...] | None = None
    num_classes: int = 14
    pool_first: bool = False
    _available: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive(self.in_channels, "in_channels")
        _positive(self.stem_channels, "stem_channels")
        _positive(self.num_classes, "num_classes")
        if not isinstance(self.pool_first, bool):
            raise ValueError(f"Invalid pool_first {self.pool_first!r} - must be true or false")
        blocks = tuple(tuple(_layer_from(layer) for layer in block) for block in self.blocks)
        transitions = tuple(_transition_from(t) for t in self.transitions)
        if not blocks:
            raise ValueError("Invalid blocks: an architecture needs at least one dense block")
        for b, block in enumerate(blocks, start=1):
            if not block:
                raise ValueError(f"Invalid denseblock{b}: a dense block needs at least one layer")
        if len(transitions) != len(blocks) - 1:
            raise ValueError(
                f"Invalid transitions: {len(transitions)} given - expected {len(blocks) - 1} "
                f"(one between each pair of the {len(blocks)} blocks)"
            )
        available: list[tuple[int, ...]] = []  # per block: channels available to each layer, then the block output
        channels = self.stem_channels
        for b, block in enumerate(blocks, start=1):
            counts = []
            for i, layer in enumerate(block, start=1):
                _as_indices(layer.kept_inputs, channels, f"denseblock{b}.denselayer{i}")
                counts.append(channels)
                channels += layer.growth
            counts.append(channels)
            available.append(tuple(counts))
            if b <= len(transitions):
                _as_indices(transitions[b - 1].kept_inputs, channels, f"transition{b}")
                channels = transitions[b - 1].out_channels
        head = _as_indices(self.head_inputs, channels, "the head (norm5/classifier)")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "transitions", transitions)
        object.__setattr__(self, "head_inputs", head)
        object.__setattr__(self, "_available", tuple(available))

    # ----------------------------------------------------------------------------------------------- constructors
    @classmethod
    def densenet(
        cls,
        block_config: Sequence[int],
        *,
        growth_rate: int = 32,
        bn_size: int = 4,
        stem_channels: int = 64,
        compression: float = 0.5,
        in_channels: int = 3,
        num_classes: int = 14,
    ) -> Architecture:
        """The uniform DenseNet-BC family (torchvision's ``DenseNet(growth_rate, block_config, ...)``)."""
        _positive(growth_rate, "growth_rate")
        _positive(bn_size, "bn_size")
        if not 0 < compression <= 1:
            raise ValueError(f"Invalid compression {compression} - must be in (0, 1]")
        blocks, transitions = [], []
        channels = stem_channels
        for b, n_layers in enumerate(block_config):
            _positive(n_layers, f"number of layers in block {b + 1}")
            blocks.append(
                tuple(LayerSpec(bottleneck=bn_size * growth_rate, growth=growth_rate) for _ in range(n_layers))
            )
            channels += n_layers * growth_rate
            if b < len(block_config) - 1:
                channels = int(channels * compression)
                transitions.append(TransitionSpec(out_channels=channels))
        return cls(
            in_channels=in_channels,
            stem_channels=stem_channels,
            blocks=tuple(blocks),
            transitions=tuple(transitions),
            num_classes=num_classes,
        )

    @classmethod
    def densenet121(cls, *, in_channels: int = 3, num_classes: int = 14) -> Architecture:
        """DenseNet121 as in CheXNet: blocks (6, 12, 24, 16), growth 32, bottleneck 128, 1024 final features."""
        return cls.densenet((6, 12, 24, 16), in_channels=in_channels, num_classes=num_classes)

    @classmethod
    def tiny(cls, *, in_channels: int = 3, num_classes: int = 14) -> Architecture:
        """A four-block toy DenseNet for fast tests: stem 8, blocks (2, 2, 2, 2), growth 4, bottleneck 8."""
        return cls.densenet(
            (2, 2, 2, 2), growth_rate=4, bn_size=2, stem_channels=8, in_channels=in_channels, num_classes=num_classes
        )

    # ----------------------------------------------------------------------------------------------- channel counts
    def layer_available(self, block: int, layer: int) -> int:
        """Concatenated channels offered to layer ``layer`` of block ``block`` (both 0-based) before any gather."""
        return self._available[block][layer]

    def layer_inputs(self, block: int, layer: int) -> int:
        """Channels layer ``layer`` of block ``block`` (0-based) actually reads (its ``norm1``/``conv1`` width)."""
        kept = self.blocks[block][layer].kept_inputs
        return len(kept) if kept is not None else self._available[block][layer]

    def block_output(self, block: int) -> int:
        """Channels of block ``block``'s (0-based) concatenated output."""
        return self._available[block][-1]

    def transition_inputs(self, index: int) -> int:
        """Channels transition ``index`` (0-based) reads."""
        kept = self.transitions[index].kept_inputs
        return len(kept) if kept is not None else self.block_output(index)

    @property
    def feature_channels(self) -> int:
        """Channels C of ``forward_features`` (norm5's width and the classifier's input)."""
        return len(self.head_inputs) if self.head_inputs is not None else self.block_output(len(self.blocks) - 1)

    def parameters(self) -> int:
        """Trainable parameters (conv and BatchNorm weights, classifier weight and bias), computed from the spec."""
        n = self.in_channels * self.stem_channels * 49 + 2 * self.stem_channels
        for b, block in enumerate(self.blocks):
            for i, layer in enumerate(block):
                n_in = self.layer_inputs(b, i)
                n += 2 * n_in + n_in * layer.bottleneck + 2 * layer.bottleneck + layer.bottleneck * layer.growth * 9
            if b < len(self.transitions):
                n_in = self.transition_inputs(b)
                n += 2 * n_in + n_in * self.transitions[b].out_channels
        c = self.feature_channels
        return n + 2 * c + c * self.num_classes + self.num_classes

    # ----------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` inverts it. ``pool_first`` appears only when true, so manifests
        written before it existed keep their content hash."""
        data = {
            "in_channels": self.in_channels,
            "stem_channels": self.stem_channels,
            "blocks": [[layer.to_dict() for layer in block] for block in self.blocks],
            "transitions": [t.to_dict() for t in self.transitions],
            "head_inputs": None if self.head_inputs is None else list(self.head_inputs),
            "num_classes": self.num_classes,
        }
        if self.pool_first:
            data["pool_first"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        """Inverse of :meth:`to_dict`. Raises ValueError for unknown or missing keys and for an invalid spec."""
        if not isinstance(data, Mapping):
            raise ValueError(f"Invalid architecture {data!r} - expected a mapping")
        known = {"in_channels", "stem_channels", "blocks", "transitions", "head_inputs", "num_classes", "pool_first"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Invalid architecture: unknown keys {sorted(unknown)}")
        missing = {"blocks", "transitions"} - set(data)
        if missing:
            raise ValueError(f"Invalid architecture: missing keys {sorted(missing)}")
        blocks = data["blocks"]
        if not isinstance(blocks, Sequence) or not all(isinstance(block, Sequence) for block in blocks):
            raise ValueError("Invalid architecture: 'blocks' must be a list of lists of layers")
        return cls(
            in_channels=data.get("in_channels", 3),
            stem_channels=data.get("stem_channels", 64),
            blocks=tuple(tuple(_layer_from(layer) for layer in block) for block in blocks),
            transitions=tuple(_transition_from(t) for t in data["transitions"]),
            head_inputs=data.get("head_inputs"),
            num_classes=data.get("num_classes", 14),
            pool_first=data.get("pool_first", False),
        )

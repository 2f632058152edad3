"""Phase D: the smaller DenseNet from the refit plans; channels and layers nobody reads are dropped, kept inputs
renumbered, and every intercept folded into the consumers' BatchNorm running means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.compress.compressor import _Compressor
from model.compress.tensors import _LayerPlan, _ReaderPlan
from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec


def _live(job: _Compressor, b: int, plans: list[_LayerPlan], read: set[int]) -> tuple[set[int], list[bool]]:
    """Channels of block ``b`` still read (starting from ``read``, the block reader's inputs) and which layers
    still have a reader, walking the layers backwards (a layer is read only by later ones)."""
    alive = set(read)
    live = [False] * len(plans)
    for i in reversed(range(len(plans))):
        start = job.arch.layer_available(b, i)
        if set(range(start, start + job.arch.blocks[b][i].growth)) & alive:
            live[i] = True
            alive |= set(plans[i].inputs)
    return alive, live


def _alive(
    job: _Compressor, plans: list[list[_LayerPlan]], readers: list[_ReaderPlan]
) -> tuple[list[set[int]], list[list[bool]]]:
    """Per block: which original block channels stay, and which layers stay."""
    arch = job.arch
    n_blocks = len(arch.blocks)
    alive_sets: list[set[int]] = []
    live_layers: list[list[bool]] = []
    for b in range(n_blocks):
        last = len(plans[b]) - 1
        alive, live = _live(job, b, plans[b], set(readers[b].inputs))
        if not any(live):  # nobody reads the block's layers: keep the last one (one channel), a block needs one
            alive, live = _live(job, b, plans[b], set(readers[b].inputs) | {arch.layer_available(b, last)})
        alive_sets.append(alive)
        live_layers.append(live)
    return alive_sets, live_layers


def _layer_state(
    state: dict[str, Tensor],
    orig_state: dict[str, Tensor],
    key: str,
    okey: str,
    plan: _LayerPlan,
    bias: Tensor,
    outputs: list[int],
    start: int,
) -> None:
    """Write original dense layer ``okey``'s kept tensors into ``state`` as layer ``key``: norm1 over the kept inputs
    (running mean shifted by their producers' intercepts ``bias``), the refit conv1, norm2 over the kept bottleneck
    (running mean shifted by conv1's intercept), and the refit conv2's rows for ``outputs`` (block channel numbers;
    ``start``: the layer's first output channel)."""
    pos = torch.tensor(plan.input_pos)
    for k in ("weight", "bias", "running_var"):
        state[f"{key}.norm1.{k}"] = orig_state[f"{okey}.norm1.{k}"][pos]
    state[f"{key}.norm1.running_mean"] = orig_state[f"{okey}.norm1.running_mean"][pos] - bias[torch.tensor(plan.inputs)]
    state[f"{key}.conv1.weight"] = plan.w1[:, :, None, None].clone()
    bpos = torch.tensor(plan.bottleneck)
    for k in ("weight", "bias", "running_var"):
        state[f"{key}.norm2.{k}"] = orig_state[f"{okey}.norm2.{k}"][bpos]
    state[f"{key}.norm2.running_mean"] = orig_state[f"{okey}.norm2.running_mean"][bpos] - plan.b1
    for norm in ("norm1", "norm2"):
        state[f"{key}.{norm}.num_batches_tracked"] = orig_state[f"{okey}.{norm}.num_batches_tracked"]
    state[f"{key}.conv2.weight"] = plan.w2[torch.tensor([c - start for c in outputs])].clone()


def _reader_norm_state(
    state: dict[str, Tensor], orig_state: dict[str, Tensor], norm: str, reader: _ReaderPlan, bias: Tensor
) -> None:
    """Write a block reader's BatchNorm (a transition's or norm5) over its kept inputs into ``state``, its running
    mean shifted by the producers' intercepts ``bias`` [block channels]."""
    pos = torch.tensor(reader.input_pos)
    rbias = bias[torch.tensor(reader.inputs)]
    for k in ("weight", "bias", "running_var", "num_batches_tracked"):
        value = orig_state[f"{norm}.{k}"]
        state[f"{norm}.{k}"] = value if k == "num_batches_tracked" else value[pos]
    state[f"{norm}.running_mean"] = orig_state[f"{norm}.running_mean"][pos] - rbias


def _assemble(
    job: _Compressor, plans: list[list[_LayerPlan]], readers: list[_ReaderPlan], input_bias: list[Tensor]
) -> DenseNet:
    """Build the smaller DenseNet: drop channels nobody reads (and layers whose output nobody reads), renumber
    the kept inputs, fold every intercept into the consumers' BatchNorm running means.

    (One walk over the blocks, a little over 80 lines: the channel renumbering ``new_index`` and the intercepts
    ``bias`` carry from each layer to the next; the per-tensor copying is in the helpers above.)"""
    arch = job.arch
    n_blocks = len(arch.blocks)
    alive_sets, live_layers = _alive(job, plans, readers)
    state: dict[str, Tensor] = {}
    orig_state = {k: v.detach() for k, v in job.model.state_dict().items()}
    blocks_spec = []
    transitions_spec = []
    head_inputs: tuple[int, ...] | None = None
    prefix_in = "features.conv0"
    for b in range(n_blocks):
        alive = alive_sets[b]
        c0 = arch.layer_available(b, 0)
        kept_in = [c for c in range(c0) if c in alive]
        # producer of the block input: the stem or the previous transition
        if b == 0:
            idx = torch.tensor(kept_in)
            state[f"{prefix_in}.weight"] = orig_state["features.conv0.weight"][idx]
            for key in ("weight", "bias", "running_mean", "running_var"):
                state[f"features.norm0.{key}"] = orig_state[f"features.norm0.{key}"][idx]
            state["features.norm0.num_batches_tracked"] = orig_state["features.norm0.num_batches_tracked"]
            stem_channels = len(kept_in)
        else:
            reader = readers[b - 1]
            state[f"features.transition{b}.conv.weight"] = reader.weight[kept_in][:, :, None, None]
            transitions_spec[b - 1] = TransitionSpec(
                out_channels=len(kept_in), kept_inputs=transitions_spec[b - 1].kept_inputs
            )
        bias = torch.zeros(arch.block_output(b))
        bias[:c0] = input_bias[b]
        new_index = {c: k for k, c in enumerate(kept_in)}
        next_index = len(kept_in)
        layer_specs = []
        new_i = 0
        for i, plan in enumerate(plans[b]):
            start = arch.layer_available(b, i)
            growth = arch.blocks[b][i].growth
            bias[start : start + growth] = plan.b2
            if not live_layers[b][i]:
                continue
            outputs = [c for c in range(start, start + growth) if c in alive]
            if not outputs:  # the only layer left in a dead block: keep one channel
                outputs = [start]
            available = next_index
            inputs = [new_index[c] for c in plan.inputs]
            key = f"features.denseblock{b + 1}.denselayer{new_i + 1}"
            okey = f"features.denseblock{b + 1}.denselayer{i + 1}"
            _layer_state(state, orig_state, key, okey, plan, bias, outputs, start)
            for c in outputs:
                new_index[c] = next_index
                next_index += 1
            layer_specs.append(
                LayerSpec(
                    bottleneck=len(plan.bottleneck),
                    growth=len(outputs),
                    kept_inputs=None if inputs == list(range(available)) else tuple(inputs),
                )
            )
            new_i += 1
        blocks_spec.append(tuple(layer_specs))
        reader = readers[b]
        inputs = [new_index[c] for c in reader.inputs]
        kept = None if inputs == list(range(next_index)) else tuple(inputs)
        norm = f"features.transition{b + 1}.norm" if b < n_blocks - 1 else "features.norm5"
        _reader_norm_state(state, orig_state, norm, reader, bias)
        if b < n_blocks - 1:
            transitions_spec.append(TransitionSpec(out_channels=1, kept_inputs=kept))  # width set by next block
        else:
            head_inputs = kept
            state["classifier.weight"] = reader.weight.clone()
            state["classifier.bias"] = reader.bias.clone()
    new_arch = Architecture(
        in_channels=arch.in_channels,
        stem_channels=stem_channels,
        blocks=tuple(blocks_spec),
        transitions=tuple(transitions_spec),
        head_inputs=head_inputs,
        num_classes=arch.num_classes,
        pool_first=True,
    )
    model = DenseNet(new_arch)
    model.load_state_dict(state, strict=True)
    return model.eval()

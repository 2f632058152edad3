"""Channel pruning with least-squares weight reconstruction for the DenseNet family (He et al. 2017 style).

A DenseNet layer reads the concatenation of every earlier feature map in its block through BN-ReLU-conv1x1 (the
bottleneck, ``conv1``), then BN-ReLU-conv3x3 (``conv2``) makes its ``growth`` new channels. :func:`compress` prunes:

- each consumer's *inputs* (``kept_inputs`` of every dense layer and transition, ``head_inputs`` of norm5 and the
  classifier): a consumer reads only the concatenated channels chosen for it; a channel that no consumer reads any
  more disappears from its producer (a dense layer's ``conv2``, a transition's or the stem's conv), and a layer whose
  output nobody reads disappears altogether;
- each layer's bottleneck width (``conv1`` outputs = ``norm2`` = ``conv2`` inputs).

Channels are chosen by backward greedy selection on calibration activations: starting from all channels, the one whose
removal increases the least-squares reconstruction error of the consumer's output the least goes first (the increase
is exact for a linear least-squares fit and computed from Gram matrices, as in Optimal Brain Surgeon). How many
channels each conv keeps is set once for the whole network: every conv's error-versus-size curve is measured on the
original model, and a single Lagrange multiplier trades relative reconstruction error against parameters (and MACs),
bisected until the network meets the parameter and MAC targets.

Then, block by block, every kept conv is refit by least squares (with an intercept) so that, fed by the *compressed*
network's own activations, it reproduces the *original* network's output on the calibration images; errors do not
accumulate from layer to layer. The intercepts re-estimate the BatchNorm running means of the consumers (a conv has no
bias; BN(z + b) is BN with its mean shifted by b). An optional short distillation on the unlabeled calibration images
follows: the network (or only its last block and head) is fine-tuned to the original's class activation maps (which
fixes the logits too); it is kept only when it brings the compressed network closer to the original on held-out
calibration images.

The result is a real, smaller :class:`~model.network.DenseNet` whose :class:`~model.network.Architecture` carries the
new channel counts; it saves and loads like any other artifact. Its transitions average-pool before their 1x1 conv
(``pool_first``, exact), so a transition's kept inputs cost a quarter of the MACs they cost in torchvision's order, and
the allocation spends the MACs saved on channels elsewhere.

Modules, by stage: :mod:`~model.compress.algebra` (least-squares statistics and greedy elimination),
:mod:`~model.compress.tensors` (folded BatchNorm, sampled positions, plans), :mod:`~model.compress.compressor` (the
state every stage reads), :mod:`~model.compress.analysis` (error curves and gains on the original network),
:mod:`~model.compress.allocation` (channels per conv for the targets), :mod:`~model.compress.refit` (selection and
refit, block by block), :mod:`~model.compress.assembly` (the smaller DenseNet), :mod:`~model.compress.distill`,
:mod:`~model.compress.pipeline` (:func:`compress`), :mod:`~model.compress.report` and :mod:`~model.compress.verdict`
(paired AUROC change and the compression verdict).
"""

from model.compress.algebra import _eliminate as _eliminate  # tests check the greedy selection directly
from model.compress.algebra import _Stats as _Stats
from model.compress.distill import distill, predict_logits
from model.compress.pipeline import compress
from model.compress.report import CompressionError, CompressionReport, UnitReport
from model.compress.verdict import AurocDelta, CompressionVerdict, compression_verdict, paired_auroc_delta

__all__ = [
    "AurocDelta",
    "CompressionError",
    "CompressionReport",
    "CompressionVerdict",
    "UnitReport",
    "compress",
    "compression_verdict",
    "distill",
    "paired_auroc_delta",
    "predict_logits",
]

"""Head fine-tuning on cached pooled features versus re-running the frozen backbone every epoch.

chexd's way (``model.finetune.finetune_head``): the DenseNet backbone runs once per image to cache the pooled
features ``ā`` [N, 1024]; every epoch is then a few small matrix products. The naive way re-runs the frozen
backbone over every image in every epoch (the head's own cost is negligible next to it). The naive time is
extrapolated from the measured per-image forward time of DenseNet121 on this machine, for the same number of epochs
the cached run needed. Features are synthetic but of the real shape (default 10,000 x 1024, labels from a sparse
linear teacher with realistic prevalences), which is all the head training sees.

    .venv/bin/python -m bench.finetune_speed                  # 10,000 x 1024, DenseNet121 timed at 224 and 128 px
    .venv/bin/python -m bench.finetune_speed --images 2000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from model.features import FeatureSet
from model.finetune import finetune_head
from model.network import Architecture, DenseNet


def teacher_head(channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sparse linear head (5% non-zero weights) whose biases give rare findings, as in ChestX-ray14."""
    rng = np.random.default_rng(seed)
    weight = (rng.normal(0, 0.6, (14, channels)) * (rng.random((14, channels)) < 0.05)).astype(np.float32)
    mean_feature = 1.5 * 0.3  # of the gamma features below
    bias = (np.log(rng.uniform(0.01, 0.15, 14)) - 1.0 - mean_feature * weight.sum(1)).astype(np.float32)
    return weight, bias


def synthetic_features(n: int, teacher: tuple[np.ndarray, np.ndarray], seed: int) -> FeatureSet:
    """Pooled-feature-like rows (non-negative, as after a ReLU) with labels drawn from ``teacher``."""
    rng = np.random.default_rng(seed)
    weight, bias = teacher
    pooled = rng.gamma(1.5, 0.3, (n, weight.shape[1])).astype(np.float32)
    p = 1 / (1 + np.exp(-(pooled @ weight.T + bias)))
    labels = (rng.random(p.shape) < p).astype(np.uint8)
    return FeatureSet(ids=[str(i) for i in range(n)], patients=[None] * n, pooled=pooled, labels=labels,
                      source="synthetic")


def backbone_seconds_per_image(size: int, batch: int, repeats: int) -> float:
    """Median seconds per image of DenseNet121's frozen forward (features + pooling) at ``size`` px, fp32 CPU."""
    model = DenseNet(Architecture.densenet121()).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model.forward_features(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.forward_features(x).mean(dim=(2, 3))
            times.append((time.perf_counter() - start) / batch)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images (cached feature rows)")
    parser.add_argument("--val", type=int, default=2_000, help="validation images")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--sizes", default="224,128", help="input sizes at which DenseNet121 is timed")
    parser.add_argument("--batch", type=int, default=8, help="images per timed backbone forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the backbone (0: torch's default)")
    parser.add_argument("--head-threads", type=int, default=1, help="torch threads while training the head "
                        "(finetune_head's default: 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = teacher_head(args.channels)
    train = synthetic_features(args.images, teacher, seed=1)
    val = synthetic_features(args.val, teacher, seed=2)
    rng = np.random.default_rng(3)
    # warm start from a head that is off (as a head trained elsewhere would be): the teacher plus noise
    start_w = (teacher[0] + rng.normal(0, 0.05, teacher[0].shape)).astype(np.float32)
    start_b = (teacher[1] + rng.normal(0, 0.5, 14)).astype(np.float32)
    result = finetune_head(train, val, start_w, start_b, threads=args.head_threads)

    from model.finetune import head_aurocs

    teacher_auroc = float(np.mean([a for a in head_aurocs(val, *teacher) if a is not None]))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        per_image = backbone_seconds_per_image(size, args.batch, args.repeats)
        feature_pass = per_image * args.images
        naive = feature_pass * result.epochs
        cached_total = feature_pass + result.seconds
        rows.append({
            "input_px": size,
            "backbone_ms_per_image": per_image * 1e3,
            "feature_pass_s": feature_pass,
            "naive_s": naive,
            "cached_total_s": cached_total,
            "ratio_naive_over_cached_total": naive / cached_total,
            "ratio_naive_over_head_training": naive / result.seconds,
        })
    data = {
        "images": args.images,
        "val_images": args.val,
        "channels": args.channels,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "head_training_s": result.seconds,
        "head_s_per_epoch": result.seconds / result.epochs,
        "val_loss": [result.val_loss_before, result.val_loss_after],
        "mean_auroc": [result.mean_auroc_before, result.mean_auroc_after],
        "mean_auroc_of_the_labels_own_head": teacher_auroc,
        "target_s": 10.0,
        "rows": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "head_threads": args.head_threads,
            "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0],
        },
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return
    print(f"head fine-tuning on cached features: {args.images:,} x {args.channels} training, {args.val:,} validation; "
          f"{result.epochs} epochs (best {result.best_epoch}) in {result.seconds:.2f} s "
          f"({result.seconds / result.epochs * 1e3:.1f} ms/epoch) - target <= 10 s: "
          f"{'PASS' if result.seconds <= 10 else 'FAIL'}")
    print(f"validation loss {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}, mean AUROC "
          f"{result.mean_auroc_before:.4f} -> {result.mean_auroc_after:.4f} (the labels' own head: "
          f"{teacher_auroc:.4f})")
    print()
    print("| input | backbone ms/img | naive: backbone every epoch | chexd: features once + head | naive/chexd "
          "| naive / head training alone |")
    print("|------:|----------------:|----------------------------:|----------------------------:|-----------:"
          "|---------------------------:|")
    for r in rows:
        print(f"| {r['input_px']} px | {r['backbone_ms_per_image']:.1f} | {r['naive_s']:,.0f} s "
              f"({result.epochs} x {r['feature_pass_s']:,.0f} s) | {r['cached_total_s']:,.0f} s "
              f"({r['feature_pass_s']:,.0f} s + {result.seconds:.1f} s) | {r['ratio_naive_over_cached_total']:.1f}x "
              f"| {r['ratio_naive_over_head_training']:,.0f}x |")
    m = data["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads "
          f"({m['head_threads']} for the head), "
          f"1-min load average {m['load_average_1m']:.2f}; naive times are extrapolated from the measured "
          "per-image backbone time (forward only, no backward: the backbone is frozen)")


if __name__ == "__main__":
    main()

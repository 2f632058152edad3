"""Compression: chexd's channel selection + least-squares refit versus Torch-Pruning, on the phantom test split.

    python -m bench.compress [--model model/demo/chexd-demo.json] [--calibration-images 1000] [--test-images 5000]
                             [--target-params 0.45] [--target-macs 0.55] [--distill-steps 0] [--cache DIR]
                             [--load PATH] [--save PATH] [--json]

One run: compresses the model with :func:`model.compress.compress` (calibration: phantom *train* split images), prunes
the same model with Torch-Pruning (``MetaPruner`` + ``GroupMagnitudeImportance``, no fine-tuning; its pruning ratio
bisected to land at or just under our parameter count), and prints, for the original and both results: parameters and
conv + linear MACs, per-finding and mean AUROC on the phantom *test* split with a paired bootstrap 95% CI of the
difference to the original (the same resampled images for both models), and CPU latency at batch 1 / throughput at
batch 16 (interleaved timing, median; ratio to the original) on the engine's CPU path (channels-last, every model
traced and frozen by TorchScript), plus eager batch 1 in channels-last and NCHW. The compressed model is evaluated
after a float16 round trip, as the artifact stores it. ``--save`` writes that artifact (float16, the parent's intended
use, thresholds and provenance plus ``compress``). ``--load PATH`` evaluates an artifact compressed earlier from
``--model`` instead of compressing again (its manifest's last provenance entry must be ``compress`` with the
model's weights as parent; its settings and compression report are carried over to ``--save``).

Targets (issue 6): >= 51.43% of the parameters and >= 45% of the MACs removed; mean dAUROC >= -0.001 with its CI
containing 0; no finding below -0.005; >= 1.3x faster at CPU batch 1.

Rendered phantom images are cached as ``.npz`` under ``--cache`` (default ``$TMPDIR/chexd-bench-compress``).
Progress goes to stderr, the table (or ``--json``) to stdout. Exit status 0 whether or not targets are met.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"params_removed": 0.5143, "macs_removed": 0.45, "mean_delta": -0.001, "worst_delta": -0.005, "speedup": 1.3}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _split(name: str, count: int, recipe: Any, seed: int, cache: Path) -> tuple[Any, np.ndarray]:
    """Prepared phantom images [N, C, S, S] float16 and labels [N, 14] of one split, rendered once and cached."""
    import torch

    from model.train import render_split

    file = cache / f"phantom-{name}-seed{seed}-n{count}-s{recipe.input_size}-c{recipe.channels}-r256.npz"
    if file.exists():
        data = np.load(file)
        return torch.from_numpy(data["x"]), data["y"]
    _log(f"rendering {count} phantom {name} images (cached in {file})")
    split = render_split(name, seed=seed, count=count, recipe=recipe)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, x=split.x.numpy(), y=split.y)
    return split.x, split.y


def _macs(model: Any, size: int, channels: int) -> int:
    """Conv + linear MACs for one image, by torch's FLOP counter (any module, pruned or not)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.eval()(torch.zeros(1, channels, size, size))
    return counter.get_total_flops() // 2


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _torch_pruning(model: Any, max_params: int, size: int, channels: int) -> tuple[Any, float]:
    """Torch-Pruning's magnitude pruner on a torchvision DenseNet copy of ``model``, ratio bisected so that the
    result has at most ``max_params`` parameters (closest from below). Returns (pruned model, ratio)."""
    import torch
    import torch_pruning as tp
    import torchvision

    from model.network import Architecture

    arch = model.architecture
    first = arch.blocks[0][0]
    uniform = Architecture.densenet(
        [len(block) for block in arch.blocks],
        growth_rate=first.growth,
        bn_size=first.bottleneck // first.growth,
        stem_channels=arch.stem_channels,
        in_channels=arch.in_channels,
        num_classes=arch.num_classes,
    )
    if arch != uniform:
        raise ValueError("the Torch-Pruning comparison needs an unpruned uniform DenseNet (torchvision's family)")
    example = torch.zeros(1, channels, size, size)

    def prune(ratio: float) -> Any:
        tv = torchvision.models.DenseNet(
            growth_rate=first.growth,
            block_config=tuple(len(block) for block in arch.blocks),
            num_init_features=arch.stem_channels,
            bn_size=first.bottleneck // first.growth,
            num_classes=arch.num_classes,
        )
        if arch.in_channels != 3:
            tv.features.conv0 = torch.nn.Conv2d(arch.in_channels, arch.stem_channels, 7, 2, 3, bias=False)
        tv.load_state_dict(model.state_dict(), strict=True)
        tv.eval()
        pruner = tp.pruner.MetaPruner(
            tv,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[tv.classifier],
        )
        pruner.step()
        return tv.eval()

    lo, hi = 0.0, 0.9
    best, best_ratio = None, hi
    for _ in range(12):
        mid = (lo + hi) / 2
        pruned = prune(mid)
        if _params(pruned) <= max_params:
            hi, best, best_ratio = mid, pruned, mid
        else:
            lo = mid
        if hi - lo < 0.002:
            break
    if best is None:
        best = prune(hi)
    return best, best_ratio


def _scores(model: Any, x: Any) -> np.ndarray:
    import torch

    from model.compress import predict_logits

    return torch.sigmoid(predict_logits(model, x)).numpy()


def _fp16_round_trip(model: Any, manifest: Any, folder: Path) -> tuple[Any, Path]:
    from model.artifact import load_artifact, save_artifact

    path = save_artifact(
        model,
        folder,
        name=f"{manifest.name}-compressed",
        preprocessing=manifest.preprocessing,
        intended_use=manifest.intended_use,
        synthetic=manifest.synthetic,
        dtype="float16",
    )
    loaded, _ = load_artifact(path)
    return loaded, path


def _load_compressed(path: Path, parent: Any) -> tuple[Any, dict[str, Any], dict[str, Any], float]:
    """A compressed artifact made earlier from ``parent`` (manifest): (model, compression report dict, compress
    settings, compression seconds). Raises SystemExit with a message when it is not a compression of ``parent``."""
    from model.artifact import load_artifact

    model, manifest = load_artifact(path)
    last = manifest.provenance[-1] if manifest.provenance else {}
    if last.get("operation") != "compress" or last.get("parent_sha256") != parent.weights_sha256:
        raise SystemExit(
            f"{path}: not a compression of {parent.name} {parent.short_hash} - its last provenance entry must be "
            f"'compress' with parent_sha256 {parent.weights_sha256[:16]}..., found {last.get('operation')!r} "
            f"{str(last.get('parent_sha256'))[:16]}"
        )
    report = dict(manifest.metrics.get("compression", {}))
    return model, report, dict(last.get("parameters", {})), float(report.get("seconds", float("nan")))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from model.artifact import load_artifact, provenance_entry, save_artifact
    from model.complexity import complexity, time_forward
    from model.compress import compress, paired_auroc_delta
    from model.types import LABELS

    original, manifest = load_artifact(args.model)
    recipe = manifest.preprocessing
    size, channels = recipe.input_size, recipe.channels
    cache = Path(args.cache)
    test_x, test_y = _split("test", args.test_images, recipe, args.seed, cache)
    if args.load:
        ours, report_dict, params, compress_seconds = _load_compressed(Path(args.load), manifest)
        calibration_count = int(params.get("calibration_images", report_dict.get("calibration_images", 0)))
    else:
        calibration, _ = _split("train", args.calibration_images, recipe, args.seed, cache)
        calibration_count = len(calibration)
        _log(f"compressing {manifest.name} with {len(calibration)} calibration images")
        last = {"stage": ""}

        def progress(stage: str, done: int, total: int) -> None:
            if stage != last["stage"] or done == total or done % 10 == 0:
                _log(f"{stage} {done}/{total}")
                last["stage"] = stage

        started = time.perf_counter()
        ours, report = compress(
            original,
            calibration,
            target_params=args.target_params,
            target_macs=args.target_macs,
            distill_steps=args.distill_steps,
            seed=args.seed,
            progress=progress,
        )
        compress_seconds = time.perf_counter() - started
        report_dict = report.to_dict()
        params = {
            "target_params": args.target_params,
            "target_macs": args.target_macs,
            "calibration_images": len(calibration),
            "calibration_data": "chexd chest phantom, train split",
            "distill_steps": args.distill_steps,
            "seed": args.seed,
            "method": "greedy channel selection + least-squares refit (model.compress)",
        }
    with tempfile.TemporaryDirectory() as tmp:
        ours, _ = _fp16_round_trip(ours, manifest, Path(tmp))

    _log("Torch-Pruning at the same parameter count")
    started = time.perf_counter()
    tp_model, tp_ratio = _torch_pruning(original, _params(ours), size, channels)
    tp_seconds = time.perf_counter() - started

    models = {"original": original, "chexd": ours, "torch-pruning": tp_model}
    _log("evaluating on the phantom test split")
    scores = {name: _scores(m, test_x) for name, m in models.items()}
    deltas = {
        name: paired_auroc_delta(scores["original"], scores[name], test_y, LABELS, n_bootstrap=args.n_bootstrap)
        for name in ("chexd", "torch-pruning")
    }
    if args.timing_threads:
        torch.set_num_threads(args.timing_threads)
    _log(f"timing on the CPU (interleaved, {torch.get_num_threads()} threads)")
    timed = list(models.values())
    # the engine's CPU path: channels-last, each model traced and frozen by TorchScript
    b1 = time_forward(timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats, frozen=True)
    b16 = time_forward(
        timed, input_size=size, channels=channels, batch_size=16, repeats=max(5, args.repeats // 4), frozen=True
    )
    # eager PyTorch, channels-last and NCHW (torchvision's default, where the kept-input gathers cost less)
    b1_eager = time_forward(timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats)
    b1_nchw = time_forward(
        timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats, channels_last=False
    )
    rows = {}
    for k, (name, m) in enumerate(models.items()):
        rows[name] = {
            "parameters": _params(m),
            "macs": _macs(m, size, channels),
            "batch1_ms": b1[k] * 1000,
            "batch16_images_per_s": 16 / b16[k],
            "batch1_speedup": b1[0] / b1[k],
            "batch16_speedup": b16[0] / b16[k],
            "batch1_eager_ms": b1_eager[k] * 1000,
            "batch1_eager_speedup": b1_eager[0] / b1_eager[k],
            "batch1_nchw_ms": b1_nchw[k] * 1000,
            "batch1_nchw_speedup": b1_nchw[0] / b1_nchw[k],
        }
    assert rows["chexd"]["macs"] == complexity(ours.architecture, size).macs
    for name in ("chexd", "torch-pruning"):
        d = deltas[name]
        rows[name] |= {
            "params_removed": 1 - rows[name]["parameters"] / rows["original"]["parameters"],
            "macs_removed": 1 - rows[name]["macs"] / rows["original"]["macs"],
            "mean_auroc": d.mean_after,
            "mean_delta": d.mean_delta,
            "mean_delta_ci": list(d.mean_delta_ci),
            "worst_delta": min(v for v in d.delta if v is not None),
        }
    rows["original"] |= {"mean_auroc": deltas["chexd"].mean_before, "params_removed": 0.0, "macs_removed": 0.0}
    c = rows["chexd"]
    checks = {
        "params_removed": c["params_removed"] >= TARGETS["params_removed"],
        "macs_removed": c["macs_removed"] >= TARGETS["macs_removed"],
        "mean_delta": c["mean_delta"] >= TARGETS["mean_delta"] and c["mean_delta_ci"][0] <= 0 <= c["mean_delta_ci"][1],
        "worst_delta": c["worst_delta"] >= TARGETS["worst_delta"],
        "speedup": c["batch1_speedup"] >= TARGETS["speedup"],
    }
    result = {
        "command": " ".join(["python -m bench.compress", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
            "python": platform.python_version(),
        },
        "model": f"{manifest.name} {manifest.short_hash}",
        "input_size": size,
        "calibration_images": calibration_count,
        "test_images": len(test_x),
        "compress_seconds": round(compress_seconds, 1),
        "loaded": args.load,
        "torch_pruning": {"ratio": round(tp_ratio, 4), "seconds": round(tp_seconds, 1)},
        "report": report_dict,
        "rows": rows,
        "deltas": {name: d.to_dict() for name, d in deltas.items()},
        "targets": TARGETS,
        "checks": checks,
    }
    if args.save:
        metrics = {
            "parameters": c["parameters"],
            "macs": c["macs"],
            "input_size": size,
            "compression": {k: v for k, v in report_dict.items() if k != "units"},
            "test": {"split": "test", "images": len(test_x), "seed": args.seed} | deltas["chexd"].to_dict(),
            "latency": {k: round(v, 3) for k, v in c.items() if k.startswith("batch")} | {"device": "cpu"},
            "torch_pruning_at_same_parameters": {
                k: rows["torch-pruning"][k] for k in ("parameters", "macs", "mean_auroc", "mean_delta")
            },
        }
        path = save_artifact(
            ours,
            Path(args.save),
            name=Path(args.save).stem if Path(args.save).suffix == ".json" else f"{manifest.name}-compressed",
            preprocessing=recipe,
            intended_use=manifest.intended_use,
            version=manifest.version,
            labels=manifest.labels,
            thresholds=manifest.thresholds,
            provenance=(
                *manifest.provenance,
                provenance_entry("compress", params, parent_sha256=manifest.weights_sha256),
            ),
            metrics=metrics,
            synthetic=manifest.synthetic,
            dtype="float16",
        )
        result["saved"] = str(path)
    return result


def _table(result: dict[str, Any]) -> str:
    rows, deltas = result["rows"], result["deltas"]
    lines = [
        f"{result['model']} at {result['input_size']} px; calibration {result['calibration_images']} phantom train "
        f"images, evaluation {result['test_images']} phantom test images; {result['machine']['cpus']} CPUs, "
        f"torch {result['machine']['torch']}, {result['machine']['threads']} threads",
        "",
        "| model | parameters | removed | MACs (G) | removed | mean AUROC | ΔAUROC [95% CI] | worst Δ "
        "| CPU b1 ms | speed-up | b16 img/s | ratio | eager b1 ms | speed-up | eager NCHW b1 ms | speed-up |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in rows.items():
        if name == "original":
            delta, worst = "-", "-"
        else:
            lo, hi = r["mean_delta_ci"]
            delta, worst = f"{r['mean_delta']:+.4f} [{lo:+.4f}, {hi:+.4f}]", f"{r['worst_delta']:+.4f}"
        label = name if name != "torch-pruning" else f"Torch-Pruning (ratio {result['torch_pruning']['ratio']})"
        lines.append(
            f"| {label} | {r['parameters']:,} | {r['params_removed']:.2%} | {r['macs'] / 1e9:.3f} | "
            f"{r['macs_removed']:.2%} | {r['mean_auroc']:.4f} | {delta} | {worst} | {r['batch1_ms']:.2f} | "
            f"{r['batch1_speedup']:.2f}x | {r['batch16_images_per_s']:.1f} | {r['batch16_speedup']:.2f}x | "
            f"{r['batch1_eager_ms']:.2f} | {r['batch1_eager_speedup']:.2f}x | "
            f"{r['batch1_nchw_ms']:.2f} | {r['batch1_nchw_speedup']:.2f}x |"
        )
    lines += ["", "| finding | original | chexd | Δ [95% CI] | Torch-Pruning | Δ [95% CI] |"]
    lines.append("|---|--:|--:|--:|--:|--:|")
    ours, tp = deltas["chexd"]["findings"], deltas["torch-pruning"]["findings"]
    for a, b in zip(ours, tp, strict=True):
        if a["before"] is None:
            lines.append(f"| {a['label']} | - | - | - | - | - |")
            continue
        ca, cb = a["delta_ci"], b["delta_ci"]
        lines.append(
            f"| {a['label']} | {a['before']:.4f} | {a['after']:.4f} | {a['delta']:+.4f} [{ca[0]:+.4f}, {ca[1]:+.4f}] "
            f"| {b['after']:.4f} | {b['delta']:+.4f} [{cb[0]:+.4f}, {cb[1]:+.4f}] |"
        )
    t = result["targets"]
    names = {
        "params_removed": f"parameters removed >= {t['params_removed']:.2%}",
        "macs_removed": f"MACs removed >= {t['macs_removed']:.0%}",
        "mean_delta": f"mean ΔAUROC >= {t['mean_delta']} with CI containing 0",
        "worst_delta": f"no finding below {t['worst_delta']}",
        "speedup": f">= {t['speedup']}x at CPU batch 1 (the engine's path: channels-last, frozen TorchScript)",
    }
    lines += [""] + [f"{'PASS' if ok else 'FAIL'}  {names[k]}" for k, ok in result["checks"].items()]
    rep = result["report"]
    lines.append(
        (f"loaded {result['loaded']} (compressed earlier); " if result.get("loaded") else "")
        + f"compression took {result['compress_seconds']} s; held-out calibration logit RMSE "
        f"{rep.get('logit_rmse', float('nan')):.4f} (distilled: {rep.get('distilled')}); "
        + (
            f"MACs removed by pruning alone (against the original with its transitions pooling first too, an exact "
            f"reorder): {rep['macs_removed_by_pruning']:.2%}; "
            if "macs_removed_by_pruning" in rep
            else ""
        )
        + f"Torch-Pruning {result['torch_pruning']['seconds']} s"
    )
    if "saved" in result:
        lines.append(f"saved {result['saved']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "model" / "demo" / "chexd-demo.json"))
    parser.add_argument("--calibration-images", type=int, default=1000)
    # 5,000: the phantom's prevalences follow ChestX-ray14's, and 1,000 test images hold 2 Hernia, 9 Edema and
    # 9 Fibrosis positives - too few for a per-finding AUROC difference (5,000: 8, 71, 72)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--target-params", type=float, default=0.45)
    parser.add_argument("--target-macs", type=float, default=0.55)
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=40, help="timed batch-1 forwards per model")
    parser.add_argument(
        "--timing-threads", type=int, default=None,
        help="torch threads for the timings only (default: torch's; the daemon's model_threads on a 2-core host is 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "chexd-bench-compress"))
    parser.add_argument("--load", default=None, help="evaluate this artifact, compressed earlier from --model")
    parser.add_argument("--save", default=None, help="write the compressed artifact here (.json path or folder)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = parser.parse_args(argv)
    if "torch" not in sys.modules:
        # idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning made CPU timings
        # meaningless (bench/README.md, engine_speed); set before torch is imported
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.calibration_images < 16 or args.test_images < 20:
        parser.error("--calibration-images must be >= 16 and --test-images >= 20")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", stream=sys.stderr)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

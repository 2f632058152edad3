"""Compression: chexd's channel selection + least-squares refit versus Torch-Pruning, on a phantom split.

    python -m bench.compress [--model model/demo/chexd-demo.json] [--calibration-images 1000] [--eval-images 5000]
                             [--split select|test] [--target-params 0.45] [--target-macs 0.55] [--distill-steps 0]
                             [--cache DIR] [--load PATH] [--save PATH] [--auroc-only] [--json]

Which images judge what. Three patient-disjoint phantom splits (``model.train.split_of``, by a hash of the patient id):

- *train*: the calibration images the compression fits on;
- ``--split select`` (the default): the phantom *val* split, the **selection split** - run the bench here while
  choosing hyper-parameters (targets, calibration images, distillation); it shares no patient with train or test;
- ``--split test``: the phantom *test* split - run it once, for the settings chosen on ``select``, to report them.
  Choosing settings by their test figures makes the test figures optimistic; earlier rounds did (issue 13).

One run: compresses the model with :func:`model.compress.compress` (calibration: phantom *train* split images), prunes
the same model with Torch-Pruning (``MetaPruner`` + ``GroupMagnitudeImportance``, no fine-tuning; its pruning ratio
bisected to land at or just under our parameter count), and prints, for the original and both results: parameters and
conv + linear MACs, per-finding and mean AUROC on the chosen split with a paired bootstrap 95% CI of the difference to
the original (the same resampled PATIENTS for both models), the number of positives per finding, the honest verdict
(:func:`model.compress.compression_verdict`), and CPU latency at batch 1 / throughput at
batch 16 (interleaved timing, median; ratio to the original) on the engine's CPU path (channels-last, every model
traced and frozen by TorchScript), plus eager batch 1 in channels-last and NCHW. The compressed model is evaluated
after a float16 round trip, as the artifact stores it. ``--save`` writes that artifact (float16, the parent's intended
use, thresholds and provenance plus ``compress``). ``--load PATH`` evaluates an artifact compressed earlier from
``--model`` instead of compressing again (its manifest's last provenance entry must be ``compress`` with the
model's weights as parent; its settings and compression report are carried over to ``--save``).

Targets (issues 6 and 13): >= 51.43% of the parameters and >= 45% of the MACs removed; >= 1.3x faster at CPU batch 1;
and the AUROC verdict: over the findings with at least ``MIN_POSITIVES`` (10) positives, the 95% CI of the mean
ΔAUROC reaches 0, and no such finding has its CI entirely below -0.005 (findings with fewer positives are listed, not
judged). ``--auroc-only`` skips Torch-Pruning and the timings (the AUROC comparison of ``--load`` with its parent
takes a few minutes on 2 cores for 1,000 images).

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


SPLIT_SOURCES = {"select": "val", "test": "test", "train": "train"}  # bench split -> phantom split (model.train)


def _split(name: str, count: int, recipe: Any, seed: int, cache: Path) -> tuple[Any, np.ndarray, tuple[str, ...]]:
    """Prepared phantom images [N, C, S, S] float16, labels [N, 14] and patient ids [N] of one split (``select`` is
    the phantom val split), rendered once and cached."""
    import torch

    from model.train import render_split

    phantom = SPLIT_SOURCES[name]
    file = cache / f"phantom-{phantom}-seed{seed}-n{count}-s{recipe.input_size}-c{recipe.channels}-r256.npz"
    if file.exists():
        data = np.load(file)
        if "p" in data:
            return torch.from_numpy(data["x"]), data["y"], tuple(str(p) for p in data["p"])
    _log(f"rendering {count} phantom {phantom} images (cached in {file})")
    split = render_split(phantom, seed=seed, count=count, recipe=recipe)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, x=split.x.numpy(), y=split.y, p=np.array(split.patients))
    return split.x, split.y, split.patients


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
    from model.compress import compress, compression_verdict, paired_auroc_delta
    from model.types import LABELS

    original, manifest = load_artifact(args.model)
    recipe = manifest.preprocessing
    size, channels = recipe.input_size, recipe.channels
    cache = Path(args.cache)
    test_x, test_y, test_patients = _split(args.split, args.eval_images, recipe, args.seed, cache)
    if args.load:
        ours, report_dict, params, compress_seconds = _load_compressed(Path(args.load), manifest)
        calibration_count = int(params.get("calibration_images", report_dict.get("calibration_images", 0)))
    else:
        calibration, _, _ = _split("train", args.calibration_images, recipe, args.seed, cache)
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

    models = {"original": original, "chexd": ours}
    tp_ratio, tp_seconds = float("nan"), 0.0
    if not args.auroc_only:
        _log("Torch-Pruning at the same parameter count")
        started = time.perf_counter()
        models["torch-pruning"], tp_ratio = _torch_pruning(original, _params(ours), size, channels)
        tp_seconds = time.perf_counter() - started

    _log(f"evaluating on the phantom {SPLIT_SOURCES[args.split]} split ({args.split}), {len(test_x)} images")
    scores = {name: _scores(m, test_x) for name, m in models.items()}
    deltas = {
        name: paired_auroc_delta(
            scores["original"], scores[name], test_y, LABELS, n_bootstrap=args.n_bootstrap, seed=args.seed,
            patients=test_patients,
        )
        for name in models
        if name != "original"
    }
    verdict = compression_verdict(deltas["chexd"])
    timings: dict[str, list[float]] = {}
    if not args.auroc_only:
        if args.timing_threads:
            torch.set_num_threads(args.timing_threads)
        _log(f"timing on the CPU (interleaved, {torch.get_num_threads()} threads)")
        timed = list(models.values())
        # the engine's CPU path: channels-last, each model traced and frozen by TorchScript
        timings["batch1"] = time_forward(
            timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats, frozen=True
        )
        timings["batch16"] = time_forward(
            timed, input_size=size, channels=channels, batch_size=16, repeats=max(5, args.repeats // 4), frozen=True
        )
        # eager PyTorch, channels-last and NCHW (torchvision's default, where the kept-input gathers cost less)
        timings["batch1_eager"] = time_forward(
            timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats
        )
        timings["batch1_nchw"] = time_forward(
            timed, input_size=size, channels=channels, batch_size=1, repeats=args.repeats, channels_last=False
        )
    rows: dict[str, dict[str, Any]] = {}
    for k, (name, m) in enumerate(models.items()):
        rows[name] = {"parameters": _params(m), "macs": _macs(m, size, channels)}
        if timings:
            b1, b16, b1_eager, b1_nchw = (timings[key] for key in ("batch1", "batch16", "batch1_eager", "batch1_nchw"))
            rows[name] |= {
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
    for name, d in deltas.items():
        judged = [v for v, label in zip(d.delta, d.labels, strict=True) if v is not None and label in d.eligible]
        rows[name] |= {
            "params_removed": 1 - rows[name]["parameters"] / rows["original"]["parameters"],
            "macs_removed": 1 - rows[name]["macs"] / rows["original"]["macs"],
            "mean_auroc": d.mean_after,
            "mean_delta": d.mean_delta,
            "mean_delta_ci": list(d.mean_delta_ci),
            "mean_auroc_eligible": d.mean_after_eligible,
            "mean_delta_eligible": d.mean_delta_eligible,
            "mean_delta_eligible_ci": list(d.mean_delta_eligible_ci) if d.mean_delta_eligible_ci else None,
            "worst_delta": min(v for v in d.delta if v is not None),
            "worst_delta_eligible": min(judged) if judged else None,
        }
    rows["original"] |= {
        "mean_auroc": deltas["chexd"].mean_before,
        "mean_auroc_eligible": deltas["chexd"].mean_before_eligible,
        "params_removed": 0.0,
        "macs_removed": 0.0,
    }
    c = rows["chexd"]
    checks = {
        "params_removed": c["params_removed"] >= TARGETS["params_removed"],
        "macs_removed": c["macs_removed"] >= TARGETS["macs_removed"],
        "auroc_verdict": verdict.met,
    }
    if timings:
        checks["speedup"] = c["batch1_speedup"] >= TARGETS["speedup"]
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
        "split": args.split,
        "phantom_split": SPLIT_SOURCES[args.split],
        "eval_images": len(test_x),
        "eval_patients": len(set(test_patients)),
        "compress_seconds": round(compress_seconds, 1),
        "loaded": args.load,
        "torch_pruning": (
            {"ratio": round(tp_ratio, 4), "seconds": round(tp_seconds, 1)} if "torch-pruning" in models else None
        ),
        "report": report_dict,
        "rows": rows,
        "deltas": {name: d.to_dict() for name, d in deltas.items()},
        "verdict": verdict.to_dict(),
        "targets": TARGETS,
        "checks": checks,
    }
    if args.save:
        metrics = {
            "parameters": c["parameters"],
            "macs": c["macs"],
            "input_size": size,
            "compression": {k: v for k, v in report_dict.items() if k != "units"},
            # the figures of the split it was evaluated on: "test" only when --split test, else "selection"
            ("test" if args.split == "test" else "selection"): {
                "split": SPLIT_SOURCES[args.split],
                "images": len(test_x),
                "seed": args.seed,
            }
            | deltas["chexd"].to_dict()
            | {"verdict": verdict.to_dict()},
        }
        if timings:
            metrics["latency"] = {k: round(v, 3) for k, v in c.items() if k.startswith("batch")} | {"device": "cpu"}
        if "torch-pruning" in rows:
            metrics["torch_pruning_at_same_parameters"] = {
                k: rows["torch-pruning"][k] for k in ("parameters", "macs", "mean_auroc", "mean_delta")
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


def _ci_text(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"


def _table(result: dict[str, Any]) -> str:
    rows, deltas, verdict = result["rows"], result["deltas"], result["verdict"]
    timed = "batch1_ms" in rows["original"]
    lines = [
        f"{result['model']} at {result['input_size']} px; calibration {result['calibration_images']} phantom train "
        f"images; evaluation {result['eval_images']} phantom {result['phantom_split']} images ({result['split']} "
        f"split, {result['eval_patients']} patients, bootstrap resamples {deltas['chexd']['resampled']}); "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}, {result['machine']['threads']} "
        "threads",
        "",
        "| model | parameters | removed | MACs (G) | removed | mean AUROC | ΔAUROC [95% CI] | mean AUROC, ≥10 pos. "
        "| ΔAUROC, ≥10 pos. [95% CI] | worst Δ (≥10 pos.) |"
        + (" CPU b1 ms | speed-up | b16 img/s | ratio | eager b1 ms | speed-up | eager NCHW b1 ms | speed-up |"
           if timed else ""),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" * 8 if timed else ""),
    ]
    for name, r in rows.items():
        if name == "original":
            delta = delta_eligible = worst = "-"
        else:
            delta = f"{r['mean_delta']:+.4f} {_ci_text(r['mean_delta_ci'])}"
            delta_eligible = (f"{r['mean_delta_eligible']:+.4f} {_ci_text(r['mean_delta_eligible_ci'])}"
                              if r["mean_delta_eligible"] is not None else "-")
            worst = f"{r['worst_delta_eligible']:+.4f}" if r["worst_delta_eligible"] is not None else "-"
        eligible_auroc = f"{r['mean_auroc_eligible']:.4f}" if r.get("mean_auroc_eligible") is not None else "-"
        label = name if name != "torch-pruning" else f"Torch-Pruning (ratio {result['torch_pruning']['ratio']})"
        line = (
            f"| {label} | {r['parameters']:,} | {r['params_removed']:.2%} | {r['macs'] / 1e9:.3f} | "
            f"{r['macs_removed']:.2%} | {r['mean_auroc']:.4f} | {delta} | {eligible_auroc} | {delta_eligible} | "
            f"{worst} |"
        )
        if timed:
            line += (
                f" {r['batch1_ms']:.2f} | {r['batch1_speedup']:.2f}x | {r['batch16_images_per_s']:.1f} | "
                f"{r['batch16_speedup']:.2f}x | {r['batch1_eager_ms']:.2f} | {r['batch1_eager_speedup']:.2f}x | "
                f"{r['batch1_nchw_ms']:.2f} | {r['batch1_nchw_speedup']:.2f}x |"
            )
        lines.append(line)
    others = [name for name in deltas if name != "chexd"]
    lines += ["", "| finding | positives | original | chexd | Δ [95% CI] | judged |"
              + "".join(" Torch-Pruning | Δ [95% CI] |" for _ in others)]
    lines.append("|---|--:|--:|--:|--:|---|" + "--:|--:|" * len(others))
    judged = set(verdict["judged"])
    failing, below_zero = set(verdict["failing"]), set(verdict["below_zero"])
    for c, a in enumerate(deltas["chexd"]["findings"]):
        if a["before"] is None:
            rest = " - | - |" * len(others)
            lines.append(f"| {a['label']} | {a['positives']} | - | - | - | no (one outcome) |{rest}")
            continue
        mark = ("FAIL (CI below floor)" if a["label"] in failing else "yes, CI below 0" if a["label"] in below_zero
                else "yes") if a["label"] in judged else f"no (< {verdict['min_positives']} positives)"
        line = (f"| {a['label']} | {a['positives']} | {a['before']:.4f} | {a['after']:.4f} | {a['delta']:+.4f} "
                f"{_ci_text(a['delta_ci'])} | {mark} |")
        for name in others:
            b = deltas[name]["findings"][c]
            line += f" {b['after']:.4f} | {b['delta']:+.4f} {_ci_text(b['delta_ci'])} |"
        lines.append(line)
    t = result["targets"]
    names = {
        "params_removed": f"parameters removed >= {t['params_removed']:.2%}",
        "macs_removed": f"MACs removed >= {t['macs_removed']:.0%}",
        "auroc_verdict": f"AUROC verdict {verdict['verdict']!r}: {verdict['reason']}",
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
        + (f"Torch-Pruning {result['torch_pruning']['seconds']} s" if others else "Torch-Pruning and timings skipped")
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
    parser.add_argument("--eval-images", "--test-images", dest="eval_images", type=int, default=5000,
                        help="images of --split to evaluate on")
    parser.add_argument(
        "--split", choices=("select", "test"), default="select",
        help="select (default): the phantom val split, for choosing hyper-parameters; test: the final report only",
    )
    parser.add_argument("--auroc-only", action="store_true", help="skip Torch-Pruning and the CPU timings")
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
    if args.calibration_images < 16 or args.eval_images < 20:
        parser.error("--calibration-images must be >= 16 and --eval-images >= 20")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s", stream=sys.stderr)
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

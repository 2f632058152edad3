"""CPU inference speed: chexd's engine (logits + 14 CAMs + channel evidence from one forward) beside torchvision's
eager DenseNet121 forward and pytorch-grad-cam's GradCAM for the 14 heatmaps, same weights, same run.

    python -m bench.engine_speed [--sizes 224,128] [--batches 1,16] [--repeat 15] [--gradcam-batches 1,16] [--json]

Weights: the bundled demo model (DenseNet121, 6,968,206 parameters; or ``--model``), loaded into chexd's engine and,
with ``strict=True``, into ``torchvision.models.densenet121(num_classes=14)``. Inputs are random normal tensors
``[B, 3, S, S]`` (the forward's cost does not depend on pixel values), as in ../shared/reference/gpu_anchor.py.
Everything runs with ``torch.set_num_threads(2)`` under ``torch.inference_mode()`` (Grad-CAM needs gradients), fp32.

Timed, per (input size S, batch B), in ms per image:

- **torchvision eager**: ``model(x)``, NCHW fp32 - the off-the-shelf forward (logits only);
- **engine forward only**: the engine's own network path without the head extras (channels_last, the feature
  extractor frozen by TorchScript, logits only);
- **engine full**: ``Engine.forward`` + the conversion to ``Prediction`` objects - logits, probabilities, all 14
  CAMs ``[14, S/32, S/32]`` and the top-k channel evidence, i.e. ``Engine.predict`` minus the image preprocessing;
- **engine predict from 512-px images** (information): ``Engine.predict`` on decoded 512x512 images, including the
  resize/normalisation (``model.engine.prepare``);
- **pytorch-grad-cam**: ``GradCAM(model=torchvision model, target_layers=[features[-1]])`` called once per class
  (14 forward+backward passes, each for the whole batch) - the library's documented usage and gpu_anchor.py's set-up.
  The engine's equivalent is "engine full" (its CAMs come from the same forward).

Methodology: warm-up runs, then the variants are timed round-robin (so load from other processes on a shared machine
falls on all of them alike) and the median is reported. ``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported
(``--omp-wait-policy``): with OpenMP's default spinning, 2 threads on the busy 2-core machine this was written on
made a DenseNet121 forward 14x slower (median 2.1 s instead of 0.16 s) and the timings meaningless.
"CAMs + evidence alone": the engine's head (pooling, logits, 14 CAMs, all channel contributions, top-k, Prediction
objects) minus a logits-only head, both timed on features computed once, as a fraction of the engine's forward
(target <= 15%): the difference of two ~100-ms forwards cannot resolve ~1 ms on a shared machine. Also shown:
engine full / forward - 1 against torchvision eager and the engine's own forward. "engine vs grad-cam" = grad-cam /
engine full (target >= 50x).
Progress on stderr, table (or ``--json``) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

TARGET_OVERHEAD = 0.15
TARGET_GRADCAM = 50.0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _round_robin(variants: dict[str, Callable[[], object]], *, warmup: int, repeat: int) -> dict[str, list[float]]:
    """Wall-clock ms per call of each variant, ``repeat`` times, interleaved after ``warmup`` calls each."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def _load(model_path: Path | None):
    import torchvision

    from model.artifact import load_artifact

    if model_path is None:
        from daemon.store.registry import bundled_demo_model

        model_path = bundled_demo_model("full")
        if model_path is None:
            raise SystemExit("no bundled demo model in this build - pass --model")
    network, manifest = load_artifact(model_path)
    reference = torchvision.models.densenet121(num_classes=len(manifest.labels))
    try:
        reference.load_state_dict(network.state_dict(), strict=True)
    except RuntimeError as exc:
        raise SystemExit(f"{model_path}: not a plain DenseNet121 (pruned?), torchvision cannot load it: {exc}") from exc
    return network, manifest, reference.eval()


def run(*, model_path: Path | None, sizes: list[int], batches: list[int], gradcam_batches: list[int], repeat: int,
        gradcam_repeat: int, threads: int = 2) -> dict[str, object]:
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from model.engine import Engine
    from model.types import PreprocessRecipe

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    network, manifest, reference = _load(model_path)
    n_classes = len(manifest.labels)
    rows = []
    for size in sizes:
        recipe = PreprocessRecipe(channels=3, input_size=size, resize=None, normalization="imagenet")
        engine = Engine(network, recipe=recipe, labels=manifest.labels, model_version=manifest.version_id,
                        device="cpu", batch_size=max(batches))
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            images = [np.random.default_rng(i).random((512, 512)).astype(np.float32) for i in range(batch)]
            with torch.inference_mode():
                check = (engine.forward(x).logits - reference(x)).abs().max().item()
            if check > 1e-3:
                raise SystemExit(f"engine and torchvision logits differ by {check:.3g} - not the same weights")

            def torchvision_eager(x=x) -> object:
                with torch.inference_mode():
                    return reference(x)

            def engine_forward_only(x=x, engine=engine) -> object:
                with torch.inference_mode():
                    return engine.model.classifier(engine.features(x).mean(dim=(2, 3)))

            def engine_full(x=x, engine=engine) -> object:
                return engine.to_predictions(engine.forward(x))  # what predict() does after preprocessing

            def engine_predict(images=images, engine=engine) -> object:
                return engine.predict(images)

            _log(f"size {size} batch {batch}: timing forward variants ({repeat} rounds)")
            warmup = 3 if batch == 1 else 1
            times = _round_robin(
                {"torchvision_eager": torchvision_eager, "engine_forward_only": engine_forward_only,
                 "engine_full": engine_full, "engine_predict_512px": engine_predict},
                warmup=warmup, repeat=repeat,
            )
            per_image = {name: statistics.median(t) / batch for name, t in times.items()}
            spread = {name: [round(min(t) / batch, 2), round(max(t) / batch, 2)] for name, t in times.items()}

            # the extras alone, on features computed once: a difference of ~1 ms is lost in the noise of two
            # ~100 ms forwards on a shared machine, but not when only the head is timed
            with torch.inference_mode():
                features = engine.features(x)

            def head_logits(f=features, engine=engine) -> object:
                with torch.inference_mode():
                    return engine.model.classifier(f.mean(dim=(2, 3)))

            def head_full(f=features, engine=engine) -> object:
                with torch.inference_mode():
                    return engine.to_predictions(engine.head(f))

            head = _round_robin({"logits": head_logits, "full": head_full}, warmup=5, repeat=max(50, repeat))
            extras = max(0.0, statistics.median(head["full"]) - statistics.median(head["logits"])) / batch
            gradcam_ms = None
            if batch in gradcam_batches:
                reps = gradcam_repeat if batch == 1 else max(1, gradcam_repeat // 2)
                _log(f"size {size} batch {batch}: timing pytorch-grad-cam, 14 classes ({reps} runs + 1 warm-up)")
                cam = GradCAM(model=reference, target_layers=[reference.features[-1]])

                def grad_cam(x=x, cam=cam) -> object:
                    return [cam(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x)) for c in range(n_classes)]

                g = _round_robin({"grad_cam": grad_cam}, warmup=1, repeat=reps)["grad_cam"]
                cam.activations_and_grads.release()
                gradcam_ms = statistics.median(g) / batch
                spread["grad_cam_14"] = [round(min(g) / batch, 1), round(max(g) / batch, 1)]
            full = per_image["engine_full"]
            rows.append({
                "size": size,
                "batch": batch,
                "ms_per_image": {**{k: round(v, 3) for k, v in per_image.items()},
                                 "grad_cam_14": None if gradcam_ms is None else round(gradcam_ms, 1)},
                "min_max_ms_per_image": spread,
                "extras_ms_per_image": round(extras, 4),
                "extras_fraction_of_forward": extras / per_image["engine_forward_only"],
                "overhead_vs_torchvision": full / per_image["torchvision_eager"] - 1.0,
                "overhead_vs_engine_forward": full / per_image["engine_forward_only"] - 1.0,
                "gradcam_over_engine": None if gradcam_ms is None else gradcam_ms / full,
                "max_logit_difference": check,
            })
            _log(f"  {json.dumps(rows[-1]['ms_per_image'])}")
    return {
        "model": manifest.name,
        "model_version": manifest.version_id,
        "parameters": sum(p.numel() for p in network.parameters()),
        "repeat": repeat,
        "gradcam_repeat": gradcam_repeat,
        "rows": rows,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(OpenMP default: active spinning)"),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        "command": " ".join([Path(sys.executable).name, "-m", "bench.engine_speed", *sys.argv[1:]]),
    }


def _table(result: dict[str, object]) -> str:
    m = result["machine"]
    lines = [
        f"{result['model']} ({result['parameters']:,} parameters), CPU fp32, {m['torch_threads']} threads; median of "
        f"{result['repeat']} round-robin runs (grad-cam: {result['gradcam_repeat']} at batch 1, half that above); "
        "ms per image",
        "",
        "| input | batch | torchvision eager | engine fwd only | engine full (14 CAMs + evidence) "
        "| predict from 512 px | CAMs + evidence alone | engine full vs torchvision / vs own fwd "
        "| pytorch-grad-cam 14 | engine vs grad-cam |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        ms = r["ms_per_image"]
        over = f"{r['overhead_vs_torchvision'] * 100:+.1f}% / {r['overhead_vs_engine_forward'] * 100:+.1f}%"
        extras = r["extras_fraction_of_forward"]
        verdict = "PASS" if extras <= TARGET_OVERHEAD else "FAIL"
        alone = f"{r['extras_ms_per_image']:.2f} ms = {extras * 100:.1f}% {verdict}"
        gc = "-" if ms["grad_cam_14"] is None else f"{ms['grad_cam_14']:.0f}"
        ratio = "-"
        if (times := r["gradcam_over_engine"]) is not None:
            ratio = f"x{times:.0f} {'PASS' if times >= TARGET_GRADCAM else 'FAIL'}"
        lines.append(
            f"| {r['size']} | {r['batch']} | {ms['torchvision_eager']:.1f} | {ms['engine_forward_only']:.1f} "
            f"| {ms['engine_full']:.1f} | {ms['engine_predict_512px']:.1f} | {alone} | {over} | {gc} | {ratio} |"
        )
    lines += [
        "",
        f"targets: heatmaps + evidence add <= {TARGET_OVERHEAD:.0%} to the forward (CAMs + evidence alone: timed on "
        f"features computed once, as a fraction of the engine's forward); engine >= {TARGET_GRADCAM:.0f}x faster "
        "than pytorch-grad-cam for the 14 heatmaps",
        f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average_start']} -> {m['load_average_end']}, "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}; "
        f"Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}",
        f"command: {result['command']}",
    ]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="artifact manifest (default: the bundled demo)")
    parser.add_argument("--sizes", type=_ints, default=[224, 128], help="input sizes in px (default 224,128)")
    parser.add_argument("--batches", type=_ints, default=[1, 16], help="batch sizes (default 1,16)")
    parser.add_argument("--gradcam-batches", type=_ints, default=[1, 16], help="batches also timed with grad-cam")
    parser.add_argument("--repeat", type=int, default=15, help="timed rounds of the forward variants (default 15)")
    parser.add_argument("--gradcam-repeat", type=int, default=4, help="grad-cam runs at batch 1 (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE",
                        help="OpenMP idle threads sleep (PASSIVE, default) or spin; see bench/README.md")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.omp_wait_policy != "default":
        if "torch" in sys.modules:
            parser.error("--omp-wait-policy must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.repeat < 1 or args.gradcam_repeat < 1:
        parser.error("--repeat and --gradcam-repeat must be >= 1")
    for size in args.sizes:
        if size < 64 or size % 32:
            parser.error(f"--sizes: {size} - sizes must be multiples of 32, at least 64")
    result = run(model_path=args.model, sizes=args.sizes, batches=args.batches, gradcam_batches=args.gradcam_batches,
                 repeat=args.repeat, gradcam_repeat=args.gradcam_repeat, threads=args.threads)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

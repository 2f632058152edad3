"""One prepared GPU check of the engine's CUDA path: correctness against the CPU engine, then speed beside the
off-the-shelf ways on the same card, with a hard time limit on every step. Made for a session that is lent a GPU.

    python -m bench.gpu_check --dry-run                         # anywhere: the same steps on the CPU, tiny counts
    python -m bench.gpu_check --prepare-site build/gpu_site     # here, before a device run (see bench/README.md)
    PYTHONPATH=build/gpu_site:. timeout -k 10 440 python3 -m bench.gpu_check   # on the GPU machine; < 7.5 min

Steps (each under its own SIGALRM deadline, all under ``--budget-s``; a watchdog thread writes what it has and
exits 3 if the whole run overshoots by 20 s, e.g. when a CUDA call never returns):

1. **env**: torch/CUDA/cuDNN versions, the card.
2. **load**: the bundled demo model (DenseNet121; or ``--model``) into chexd's ``DenseNet`` and, with
   ``strict=True``, into ``torchvision.models.densenet121``; phantom TEST-split images (series 0, 256 px).
3. **agreement**: ``Engine`` on the device (bf16 autocast, channels_last, CUDA graphs for batch 1, 8 and 32, padding
   in between, eager bf16 above 32) against ``Engine`` on the CPU (fp32) on the phantom images, at batch 1, 5
   (padded to the graph of 8), 8, 32 and 40 (no graph). Within bf16 tolerance: probabilities |diff| <= 0.03,
   logits |diff| <= 0.15, each CAM's |diff| <= 0.06 of that CAM's largest magnitude; channel evidence sums to the
   logit (|sum phi + b - logit| <= 1e-3); the captured graphs are the ones used. Tolerances: bf16 keeps 8
   significant bits (relative step 2^-8 = 0.4%) through ~120 layers; the head is fp32 in both.
4. **latency** at batch 1, 224 px, ms/image (the rows of ../shared/reference/gpu_anchor.py, same methodology:
   warm-up 20, 200 timed calls with CUDA events, median): torchvision fp32 eager NCHW; bf16 autocast channels_last;
   bf16 weights channels_last + CUDA graph; the engine's forward (host tensor in, logits + 14 CAMs + pooled
   features back on the host) and the engine with its Prediction objects (top-k evidence on the CPU).
5. **throughput** at batch 256 (warm-up 5, 20 timed calls): torchvision bf16 weights channels_last (gpu_anchor's row),
   torchvision fp32 eager; the engine (CUDA graph of 256) from device memory, from host memory, and with Prediction
   objects.
6. **gradcam**: pytorch-grad-cam ``GradCAM`` at ``features[-1]`` (norm5, as gpu_anchor.py), 14 classes, batch 1,
   one backward per class (warm-up 2, 10 calls) against the engine's 14 CAMs from its forward (step 4), and
   gpu_anchor's hand-written "CAM from forward features" for reference.
7. **compressed** (issue 6): the bundled compressed demo against the full one, both through the engine on the device
   (bf16, CUDA graphs), at their own input size: throughput at batch 64 (target >= 1.4x) and batch-1 latency.

Targets (issue 3, H100): engine <= 2.0 ms/image at batch 1, >= 8,000 images/s at batch 256, 14 CAMs >= 50x faster
than pytorch-grad-cam. gpu_anchor's H100 figures (DESIGN.md): fp32 eager b1 9.8 ms; bf16 + CUDA graph b1 2.0 ms;
bf16 b256 0.12 ms/img (8,300 img/s); grad-cam 14 classes 871 ms; CAM from forward 10 ms.
Prints one table last; writes the same as JSON to ``$OUT/gpu_check.json`` when ``OUT`` is set (or ``--json-out``).
Exit status: 0 all steps ran (targets met or not), 1 a step failed or timed out, 3 the global watchdog fired.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TARGET_B1_MS = 2.0
TARGET_B256_IMG_S = 8000.0
TARGET_GRADCAM_X = 50.0
TOL_PROB, TOL_LOGIT, TOL_CAM, TOL_EVIDENCE = 0.03, 0.15, 0.06, 1e-3
WATCHDOG_GRACE_S = 20.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Counts of one run: the full plan mirrors gpu_anchor.py; --dry-run shrinks everything."""

    size: int = 224
    warm_b1: int = 20
    reps_b1: int = 200
    big_batch: int = 256
    warm_big: int = 5
    reps_big: int = 20
    warm_gradcam: int = 2
    reps_gradcam: int = 10
    phantoms: int = 48
    compressed_batch: int = 64
    step_limits_s: tuple[tuple[str, float], ...] = (
        ("env", 60), ("load", 60), ("agreement", 90), ("latency", 90), ("throughput", 120), ("gradcam", 60),
        ("compressed", 60),
    )
    budget_s: float = 390.0


# a smoke test of the same code on a (possibly busy) CPU: tiny counts, generous limits
DRY_RUN = Plan(warm_b1=1, reps_b1=3, big_batch=4, warm_big=1, reps_big=2, warm_gradcam=0, reps_gradcam=1,
               phantoms=48, compressed_batch=4, budget_s=2100.0,
               step_limits_s=(("env", 300), ("load", 300), ("agreement", 600), ("latency", 300), ("throughput", 300),
                              ("gradcam", 300), ("compressed", 300)))


class StepTimeout(Exception):
    """A step ran past its deadline."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise StepTimeout(f"step exceeded its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Check:
    """Runs the steps and collects results: ``steps`` (status per step), ``rows`` (timings), ``checks``."""

    def __init__(self, *, budget_s: float, json_out: Path | None, plan: Plan) -> None:
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.json_out = json_out
        self.plan = plan
        self.steps: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.checks: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def step(self, name: str, fn: Callable[[], None]) -> bool:
        limit = min(dict(self.plan.step_limits_s)[name], self.remaining() - 2.0)
        if limit < 1.0:
            self._record(name, "skipped", 0.0, "no time left in the budget")
            return False
        _log(f"[{time.monotonic() - self.started:6.1f} s] step {name} (limit {limit:.0f} s)")
        start = time.monotonic()
        try:
            with _deadline(limit):
                fn()
        except StepTimeout as exc:
            self._record(name, "timeout", time.monotonic() - start, str(exc))
            return False
        except Exception as exc:  # a failed step is reported; the remaining steps still run
            self._record(name, "error", time.monotonic() - start, f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            return False
        self._record(name, "ok", time.monotonic() - start, "")
        return True

    def _record(self, name: str, status: str, seconds: float, message: str) -> None:
        with self._lock:
            self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1), "message": message})
        _log(f"    {name}: {status} in {seconds:.1f} s {message}")

    def row(self, name: str, ms_per_call: float, batch: int, note: str = "") -> dict[str, Any]:
        ms = ms_per_call / batch
        entry = {"name": name, "batch": batch, "ms_per_image": round(ms, 4), "images_per_s": round(1000.0 / ms, 1),
                 "note": note}
        with self._lock:
            self.rows.append(entry)
        _log(f"    {name:62s} {ms:10.4f} ms/img {entry['images_per_s']:10.1f} img/s  {note}")
        return entry

    def result(self, status: str) -> dict[str, Any]:
        with self._lock:
            return {"status": status, "plan": asdict(self.plan), "meta": self.meta, "steps": list(self.steps),
                    "checks": self.checks, "rows": list(self.rows),
                    "seconds": round(time.monotonic() - self.started, 1)}

    def write(self, status: str) -> None:
        if self.json_out is None:
            return
        try:
            self.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.json_out.write_text(json.dumps(self.result(status), indent=2, default=str))
            _log(f"wrote {self.json_out}")
        except OSError as exc:
            _log(f"cannot write {self.json_out}: {exc}")


# ------------------------------------------------------------------------------------------------------ timing


def _timed(fn: Callable[[], object], *, reps: int, warm: int, cuda: bool) -> float:
    """Median ms per call, as gpu_anchor.py: warm-up calls, then CUDA events around each call (synchronised) on a
    GPU, perf_counter on the CPU."""
    import torch

    for _ in range(warm):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------- steps


def _env(ck: Check, ctx: SimpleNamespace) -> None:
    import torch
    import torchvision

    ctx.cuda = ctx.device.type == "cuda"
    meta = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "device": str(ctx.device), "cpu_threads": torch.get_num_threads()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        meta |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported()}
        torch.cuda.init()
        torch.zeros(1, device=ctx.device).sum().item()
    else:
        meta["gpu"] = None
    ck.meta |= meta


def _load(ck: Check, ctx: SimpleNamespace) -> None:
    import torch
    import torchvision

    from model.artifact import load_artifact
    from model.phantom import generate, sample_labels
    from model.train import split_of

    path = ctx.model_path
    if path is None:  # the bundled demo, found without importing daemon (its dependencies are not on the GPU image)
        path = Path(str(resources.files("model") / "demo" / "chexd-demo.json"))
        if not path.is_file():
            raise RuntimeError("no bundled demo model in this build - pass --model")
    ctx.network, ctx.manifest = load_artifact(path)
    reference = torchvision.models.densenet121(num_classes=len(ctx.manifest.labels))
    reference.load_state_dict(ctx.network.state_dict(), strict=True)
    ctx.reference = reference.eval()
    images, index = [], 0
    while len(images) < ck.plan.phantoms:
        if split_of(sample_labels(0, index).patient_id) == "test":
            images.append(generate(0, index, size=256).image)
        index += 1
    ctx.images = images
    torch.manual_seed(0)
    ck.meta |= {"model": ctx.manifest.name, "model_version": ctx.manifest.version_id,
                "input_size": ctx.manifest.preprocessing.input_size, "phantom_images": len(images)}


def _engine(ctx: SimpleNamespace, *, device: str, graphs: tuple[int, ...], batch_size: int, recipe=None,
            network=None):
    from model.engine import Engine

    return Engine(copy.deepcopy(network or ctx.network), recipe=recipe or ctx.manifest.preprocessing,
                  labels=ctx.manifest.labels,
                  model_version=ctx.manifest.version_id, device=device, batch_size=batch_size,
                  cuda_graph_batch_sizes=graphs)


def _agreement(ck: Check, ctx: SimpleNamespace) -> None:
    import numpy as np
    import torch

    from model.engine import prepare

    cpu = _engine(ctx, device="cpu", graphs=(), batch_size=16)
    reference = cpu.predict(ctx.images)
    graphs = (1, 8, 32)
    results: dict[str, Any] = {"tolerances": {"probability": TOL_PROB, "logit": TOL_LOGIT, "cam_fraction": TOL_CAM,
                                              "evidence": TOL_EVIDENCE}, "cases": []}
    ok = True
    for batch in (1, 5, 8, 32, 40):
        dev = _engine(ctx, device=str(ctx.device), graphs=graphs, batch_size=batch)
        count = min(len(ctx.images), max(batch, 8 if batch == 1 else batch))
        predictions = dev.predict(ctx.images[:count])
        pairs = list(zip(predictions, reference[:count], strict=True))
        prob = max(float(np.abs(p.probabilities - r.probabilities).max()) for p, r in pairs)
        logit = max(float(np.abs(p.logits - r.logits).max()) for p, r in pairs)
        cam = max(float((np.abs(p.cams - r.cams).max(axis=(1, 2)) / np.abs(r.cams).max(axis=(1, 2)).clip(1e-6)).max())
                  for p, r in pairs)
        out = dev.forward(torch.stack([prepare(im, dev.recipe) for im in ctx.images[:count]]))  # same path, raw
        phi = out.pooled[:, None, :] * dev.weight.cpu()[None]  # [B, n, C] channel contributions, fp32
        bias = dev.bias.cpu() if dev.bias is not None else 0.0
        evidence = float((phi.sum(dim=2) + bias - out.logits).abs().max())
        used = sorted(dev._graphs) if ctx.cuda else []
        expected = sorted({next((s for s in graphs if s >= b), None) for b in {batch, count % batch or batch}}
                          - {None}) if ctx.cuda else []
        case_ok = prob <= TOL_PROB and logit <= TOL_LOGIT and cam <= TOL_CAM and evidence <= TOL_EVIDENCE and (
            set(expected) <= set(used))
        ok &= case_ok
        results["cases"].append({"batch": batch, "images": count, "max_probability_diff": prob,
                                 "max_logit_diff": logit, "max_cam_diff_fraction": cam, "evidence_residual": evidence,
                                 "graphs_captured": used, "graphs_expected": expected, "pass": case_ok})
        _log(f"    batch {batch:2d} x{count}: |dp| {prob:.4f} |dlogit| {logit:.4f} cam {cam:.4f} evidence "
             f"{evidence:.2e} graphs {used} {'PASS' if case_ok else 'FAIL'}")
        del dev
    results["pass"] = ok
    ck.checks["agreement"] = results


def _latency(ck: Check, ctx: SimpleNamespace) -> None:
    import numpy as np
    import torch

    from model.types import PreprocessRecipe

    p, dev, cuda = ck.plan, ctx.device, ctx.cuda
    size = p.size
    torch.manual_seed(0)
    x1 = torch.randn(1, 3, size, size, device=dev)
    timed = dict(reps=p.reps_b1, warm=p.warm_b1, cuda=cuda)
    m32 = copy.deepcopy(ctx.reference).to(dev)
    with torch.inference_mode():
        ctx.tv_fp32_b1 = ck.row("torchvision fp32 eager NCHW b1", _timed(lambda: m32(x1), **timed), 1)
        torch.backends.cudnn.benchmark = True
        mcl = copy.deepcopy(ctx.reference).to(dev, memory_format=torch.channels_last)
        x1cl = x1.contiguous(memory_format=torch.channels_last)

        def bf16_autocast() -> object:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return mcl(x1cl)

        ck.row("torchvision bf16 autocast channels_last b1", _timed(bf16_autocast, **timed), 1)
    if cuda:
        mh = copy.deepcopy(ctx.reference).to(dev, memory_format=torch.channels_last).to(torch.bfloat16)
        static_x = x1cl.to(torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                mh(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_y = mh(static_x)  # kept alive while the graph replays into it
        ctx.tv_graph_b1 = ck.row("torchvision bf16 weights channels_last CUDA graph b1", _timed(graph.replay, **timed),
                                 1, "gpu_anchor's best b1 (H100: 2.0 ms)")
        del graph, mh, static_y
    recipe = PreprocessRecipe(channels=3, input_size=size, resize=None, normalization="imagenet")
    engine = _engine(ctx, device=str(dev), graphs=(1,), batch_size=1, recipe=recipe)
    host = x1.cpu()
    ctx.engine_b1 = ck.row("engine forward b1 (host in; logits+14 CAMs+pooled on host)",
                           _timed(lambda: engine.forward(host), **timed), 1,
                           "bf16 + CUDA graph" if cuda else "fp32 CPU path")
    ctx.engine_full_b1 = ck.row("engine forward + Prediction objects (top-k evidence) b1",
                                _timed(lambda: engine.to_predictions(engine.forward(host)), **timed), 1)
    image = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    ck.row("engine.predict b1 from a 512-px image (incl. CPU preprocessing)",
           _timed(lambda: engine.predict([image]), **timed), 1)


def _throughput(ck: Check, ctx: SimpleNamespace) -> None:
    import torch

    from model.types import PreprocessRecipe

    p, dev, cuda = ck.plan, ctx.device, ctx.cuda
    bs, size = p.big_batch, p.size
    timed = dict(reps=p.reps_big, warm=p.warm_big, cuda=cuda)
    torch.manual_seed(1)
    xb = torch.randn(bs, 3, size, size, device=dev)
    mh = copy.deepcopy(ctx.reference).to(dev, memory_format=torch.channels_last).to(torch.bfloat16)
    xbh = xb.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ctx.tv_bf16_big = ck.row(f"torchvision bf16 weights channels_last b{bs}", _timed(lambda: mh(xbh), **timed), bs,
                                 "gpu_anchor's b256 row (H100: 0.12 ms/img, 8,300 img/s)")
        m32 = copy.deepcopy(ctx.reference).to(dev)
        ck.row(f"torchvision fp32 eager NCHW b{bs}", _timed(lambda: m32(xb), **timed), bs)
    recipe = PreprocessRecipe(channels=3, input_size=size, resize=None, normalization="imagenet")
    engine = _engine(ctx, device=str(dev), graphs=(bs,), batch_size=bs, recipe=recipe)
    ctx.engine_big = ck.row(f"engine forward b{bs} (input in device memory)",
                            _timed(lambda: engine.forward(xb), **timed), bs,
                            "bf16 + CUDA graph" if cuda else "fp32 CPU path")
    host = xb.cpu()
    ck.row(f"engine forward b{bs} (input in host memory, incl. copy)",
           _timed(lambda: engine.forward(host), **timed), bs)
    ck.row(f"engine forward + Prediction objects b{bs}",
           _timed(lambda: engine.to_predictions(engine.forward(xb)), **timed), bs, "top-k evidence on the CPU")
    if cuda:
        ck.meta["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)


def _gradcam(ck: Check, ctx: SimpleNamespace) -> None:
    import torch
    import torch.nn.functional as F
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    p, dev, cuda, size = ck.plan, ctx.device, ctx.cuda, ck.plan.size
    n = len(ctx.manifest.labels)
    torch.manual_seed(0)
    x1 = torch.randn(1, 3, size, size, device=dev)
    mg = copy.deepcopy(ctx.reference).to(dev)
    cam = GradCAM(model=mg, target_layers=[mg.features[-1]])

    def all_classes() -> object:
        return [cam(input_tensor=x1, targets=[ClassifierOutputTarget(c)]) for c in range(n)]

    try:
        ctx.gradcam = ck.row(f"pytorch-grad-cam GradCAM, {n} classes, b1",
                             _timed(all_classes, reps=p.reps_gradcam, warm=p.warm_gradcam, cuda=cuda), 1,
                             "gpu_anchor (H100): 871 ms")
    finally:
        cam.activations_and_grads.release()
    mc = copy.deepcopy(ctx.reference).to(dev)
    weight = mc.classifier.weight

    def cam_from_features() -> object:  # gpu_anchor.py's "CAM from forward features" (fp32 eager)
        f = torch.relu(mc.features(x1))
        logits = mc.classifier(f.mean((2, 3)))
        maps = torch.einsum("kc,bchw->bkhw", weight, f)
        return logits, F.interpolate(maps, size=(size, size), mode="bilinear")

    with torch.inference_mode():
        ck.row(f"gpu_anchor CAM from forward features, {n} classes, fp32 b1",
               _timed(cam_from_features, reps=p.reps_b1, warm=p.warm_b1, cuda=cuda), 1, "gpu_anchor (H100): 10 ms")


# ------------------------------------------------------------------------------------------------------ summary


def _compressed(ck: Check, ctx: SimpleNamespace) -> None:
    """Issue 6: the bundled compressed demo model against the full one it was compressed from, both through the
    engine on the device (bf16 + CUDA graph of the batch), at the models' own input size: throughput at
    ``compressed_batch`` (target >= 1.4x) and batch-1 latency."""
    import torch

    from model.artifact import load_artifact

    path = Path(str(resources.files("model") / "demo" / "chexd-demo-compressed.json"))
    if not path.is_file():
        raise RuntimeError("this build ships no compressed demo model")
    compressed, manifest = load_artifact(path)
    if manifest.provenance[-1].get("parent_sha256") != ctx.manifest.weights_sha256:
        raise RuntimeError(f"{path.name} was not compressed from {ctx.manifest.name} - run with the bundled full demo")
    p, bs, size = ck.plan, ck.plan.compressed_batch, manifest.preprocessing.input_size
    torch.manual_seed(2)
    x = torch.randn(bs, manifest.preprocessing.channels, size, size, device=ctx.device)
    rows = {}
    for name, network in (("full", ctx.network), ("compressed", compressed)):
        big = _engine(ctx, device=str(ctx.device), graphs=(1, bs), batch_size=bs, network=network)
        rows[name] = ck.row(f"engine {name} demo b{bs} ({size} px)",
                            _timed(lambda e=big: e.forward(x), reps=p.reps_big, warm=p.warm_big, cuda=ctx.cuda), bs)
        ck.row(f"engine {name} demo b1 ({size} px)",
               _timed(lambda e=big: e.forward(x[:1]), reps=p.reps_b1, warm=p.warm_b1, cuda=ctx.cuda), 1)
    ctx.compressed_ratio = rows["compressed"]["images_per_s"] / rows["full"]["images_per_s"]
    ck.meta["compressed_model"] = f"{manifest.name} {manifest.version_id}"


def _summary(ck: Check, ctx: SimpleNamespace) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float | None, unit: str, target: str, passed: bool | None, versus: str = "") -> None:
        out.append({"name": name, "value": value, "unit": unit, "target": target, "pass": passed, "versus": versus})

    b1 = getattr(ctx, "engine_full_b1", None)
    if b1:
        tv = getattr(ctx, "tv_fp32_b1", None)
        graph = getattr(ctx, "tv_graph_b1", None)
        versus = f"torchvision fp32 eager x{tv['ms_per_image'] / b1['ms_per_image']:.2f}" if tv else ""
        if graph:
            versus += f"; bf16 CUDA graph x{graph['ms_per_image'] / b1['ms_per_image']:.2f}"
        add("engine b1 latency (with Prediction objects)", b1["ms_per_image"], "ms/img", f"<= {TARGET_B1_MS}",
            b1["ms_per_image"] <= TARGET_B1_MS, versus)
    big = getattr(ctx, "engine_big", None)
    if big:
        tv = getattr(ctx, "tv_bf16_big", None)
        versus = f"torchvision bf16 b{big['batch']} x{big['images_per_s'] / tv['images_per_s']:.2f}" if tv else ""
        add(f"engine b{big['batch']} throughput", big["images_per_s"], "img/s", f">= {TARGET_B256_IMG_S:.0f}",
            big["images_per_s"] >= TARGET_B256_IMG_S, versus)
    gc, eng = getattr(ctx, "gradcam", None), getattr(ctx, "engine_full_b1", None)
    if gc and eng:
        ratio = gc["ms_per_image"] / eng["ms_per_image"]
        add("14 CAMs: pytorch-grad-cam / engine", ratio, "x", f">= {TARGET_GRADCAM_X:.0f}", ratio >= TARGET_GRADCAM_X)
    ratio = getattr(ctx, "compressed_ratio", None)
    if ratio:
        add(f"compressed / full demo throughput b{ck.plan.compressed_batch}", ratio, "x", ">= 1.4", ratio >= 1.4)
    agreement = ck.checks.get("agreement")
    if agreement:
        add("device engine agrees with CPU fp32 engine", None, "", "bf16 tolerance", agreement["pass"])
    return out


def _table(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"device: {meta.get('gpu') or 'cpu'} ({meta.get('device')}); torch {meta.get('torch')}, CUDA "
        f"{meta.get('cuda')}, cuDNN {meta.get('cudnn')}; model {meta.get('model')} ({meta.get('model_version')}); "
        f"{result['seconds']} s; status {result['status']}",
        "",
        "| step | status | s | message |",
        "|---|---|--:|---|",
        *[f"| {s['step']} | {s['status']} | {s['seconds']} | {s['message'][:100]} |" for s in result["steps"]],
        "",
        "| agreement: batch | images | max abs dp | max abs dlogit | max CAM diff / CAM max | evidence residual "
        "| graphs captured | pass |",
        "|--:|--:|--:|--:|--:|--:|---|---|",
        *[f"| {c['batch']} | {c['images']} | {c['max_probability_diff']:.4f} | {c['max_logit_diff']:.4f} "
          f"| {c['max_cam_diff_fraction']:.4f} | {c['evidence_residual']:.1e} | {c['graphs_captured']} "
          f"| {'PASS' if c['pass'] else 'FAIL'} |" for c in result["checks"].get("agreement", {}).get("cases", [])],
        "",
        "| timing | batch | ms/img | img/s | note |",
        "|---|--:|--:|--:|---|",
        *[f"| {r['name']} | {r['batch']} | {r['ms_per_image']:.3f} | {r['images_per_s']:.0f} | {r['note']} |"
          for r in result["rows"]],
        "",
        "| summary | value | target | result | versus |",
        "|---|--:|---|---|---|",
    ]
    for s in result.get("summary", []):
        value = "-" if s["value"] is None else f"{s['value']:.3f} {s['unit']}"
        verdict = {True: "PASS", False: "FAIL", None: "-"}[s["pass"]]
        lines.append(f"| {s['name']} | {value} | {s['target']} | {verdict} | {s['versus']} |")
    return "\n".join(lines)


SITE_PACKAGES = ("pydicom", "pytorch_grad_cam", "ttach")  # pure Python, missing from the GPU machine's image


def prepare_site(folder: Path) -> int:
    """Copy the pure-Python packages the check needs but the GPU image lacks into ``folder`` (for ``carry``)."""
    import importlib.util

    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in SITE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            print(f"{name} is not installed here", file=sys.stderr)
            return 2
        target = folder / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(spec.submodule_search_locations[0], target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "tests"))
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        total += size
        print(f"{target}: {size / 2**20:.1f} MiB")
    print(f"{folder}: {total / 2**20:.1f} MiB in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny counts, CPU unless --device: a smoke test")
    parser.add_argument("--model", type=Path, default=None, help="artifact manifest (default: the bundled demo)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time for all steps (default 330 s; 1800 s with --dry-run)")
    parser.add_argument("--json-out", type=Path, default=None, help="JSON path (default $OUT/gpu_check.json)")
    parser.add_argument("--prepare-site", type=Path, default=None, metavar="DIR",
                        help=f"only copy {', '.join(SITE_PACKAGES)} into DIR for the GPU machine, then exit")
    args = parser.parse_args(argv)
    if args.prepare_site is not None:
        return prepare_site(args.prepare_site)
    if args.dry_run:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/engine_speed.py; torch is not imported yet
    json_out = args.json_out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    plan = DRY_RUN if args.dry_run else Plan()
    budget_s = args.budget_s or plan.budget_s
    ck = Check(budget_s=budget_s, json_out=json_out, plan=plan)

    def watchdog() -> None:
        _log(f"GLOBAL TIMEOUT: {budget_s + WATCHDOG_GRACE_S:.0f} s passed - writing partial results, exiting")
        result = ck.result("global-timeout")
        result["summary"] = []
        ck.write("global-timeout")
        print(_table(result), flush=True)
        os._exit(3)

    timer = threading.Timer(budget_s + WATCHDOG_GRACE_S, watchdog)
    timer.daemon = True
    timer.start()

    import torch

    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --dry-run or --device cpu)")
    ctx = SimpleNamespace(device=torch.device(device), model_path=args.model, cuda=device.startswith("cuda"))
    ok = ck.step("env", lambda: _env(ck, ctx)) and ck.step("load", lambda: _load(ck, ctx))
    if ok:
        for name, fn in (("agreement", _agreement), ("latency", _latency), ("throughput", _throughput),
                         ("gradcam", _gradcam), ("compressed", _compressed)):
            ok &= ck.step(name, lambda fn=fn: fn(ck, ctx))
            if ctx.cuda:
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    timer.cancel()
    status = "ok" if ok else "incomplete"
    result = ck.result(status)
    result["summary"] = _summary(ck, ctx)
    if json_out is not None:
        with contextlib.suppress(OSError):
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2, default=str))
            _log(f"wrote {json_out}")
    print(_table(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

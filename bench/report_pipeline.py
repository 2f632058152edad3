"""End to end on this machine: storescu N phantom images -> chexd -> every PDF, SR, SC and encapsulated PDF written,
beside a naive pipeline over the same files in the same run.

- **chexd**: a real ``chexd serve`` (bundled demo model, CPU, ``report_quiet_seconds=0`` so the study quiet time -
  a deliberate wait for more images, 5 s by default - is not counted); one image is sent and reported first (the
  report worker processes start with a daemon's first prediction), then one storescu association sends all N files.
  Latency per image = report written (``study_reports.finished_at``) - instance received (``instances.received_at``),
  both from the database. Throughput = N / (last report written - first image received).
  CPU seconds per image: user + system time of the daemon and its report worker processes from the first C-STORE
  to the last report (/proc), divided by N - less sensitive than images/s to other load on the machine.
- **naive**: per file, sequentially: ``pydicom.dcmread`` + ``pixel_array`` (min-max normalised, MONOCHROME1
  inverted), resize, torchvision ``densenet121`` eager fp32 forward with the same weights, pytorch-grad-cam
  ``GradCAM`` (one backward) per positive finding, then the same documents through the same code
  (``reporting.compose.compose_study``: PDF, SR, SCs, encapsulated PDF).
- **pointing game of the mapped region**: for each finding drawn in a phantom (ground-truth lesion mask) that chexd
  reports present, a hit when the report's main region (the zone with the largest share of heat) is a zone the
  lesion mask covers, beside the image-centre baseline (the zone at the image centre), on the same lung fields.

Run: ``.venv/bin/python bench/report_pipeline.py --count 40``. Needs dcmtk's storescu.

``--parts``: no daemon and no storescu - where ``reporting.compose.compose_study`` spends its CPU for single-image
studies of the same phantoms (the model's predictions made in-process first, untimed): CPU ms per study for the SR,
Parametric Maps, heatmap SCs, the PDF, the Encapsulated PDF, the DICOM file writes, the lung fields and the rest of the
assembly, beside the total (``time.process_time``; of ``--repeat`` passes over all studies, the one with the median
total).
``--baseline DIR`` times the ``compose_study`` of another checkout (e.g. ``git worktree add /tmp/base <commit>``) on the
same inputs in the same run, passes alternating, for before/after on the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_phantoms(folder: Path, count: int, size: int, start: int) -> list[Path]:
    from model.phantom import generate, to_dicom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"ph{index:05d}.dcm"
        to_dicom(generate(0, index, size=size)).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process and its direct children (the report worker processes), from /proc
    (Linux only; None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:  # fields[1]: ppid
            total += int(fields[11]) + int(fields[12])  # utime, stime
            found = True
    return total / tick if found else None


def _busy_cpus(seconds: float = 2.0) -> float | None:
    """CPUs kept busy by other work over the next ``seconds`` (from /proc/stat; None where there is none)."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return (1.0 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def _wait_for_reports(engine: Any, count: int, deadline: float) -> bool:
    """Poll the daemon's database until ``count`` study reports are written or failed; False at ``deadline``."""
    from sqlalchemy import text

    while True:
        with engine.connect() as conn:
            if conn.scalar(text("SELECT count(*) FROM study_reports WHERE state IN ('DONE', 'FAILED')")) >= count:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def run_chexd(files: list[Path], warm: Path, work: Path, timeout: float, model: Path) -> dict[str, object]:
    from sqlalchemy import create_engine, text

    port = _free_port()
    data = work / "chexd-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
    env.update(
        CHEXD_DATA_DIR=str(data),
        CHEXD_PORT=str(port),
        CHEXD_BIND_ADDRESS="127.0.0.1",
        CHEXD_DISK_RESERVE_MB="0",
        CHEXD_REPORT_QUIET_SECONDS="0",
        CHEXD_WORKER_POLL_SECONDS="0.1",
        CHEXD_MODEL_DEVICE="cpu",
        CHEXD_LOG_LEVEL="WARNING",
        CHEXD_MODEL_PATH=str(model),
    )
    chexd = [sys.executable, "-m", "daemon"]
    log = open(work / "chexd.log", "wb")
    proc = subprocess.Popen([*chexd, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(["echoscu", "-aec", "CHEXD", "127.0.0.1", str(port)], capture_output=True).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"chexd did not start: see {work / 'chexd.log'}")
            time.sleep(0.5)
        engine = create_engine(f"sqlite:///{data / 'chexd.db'}")
        # one image first, as a running daemon has seen: the report worker processes start with the first prediction
        subprocess.run(["storescu", "-aec", "CHEXD", "127.0.0.1", str(port), str(warm)], check=True)
        if not _wait_for_reports(engine, 1, deadline):
            raise SystemExit(f"the warm-up image got no report: see {work / 'chexd.log'}")
        cpu_before = _tree_cpu_seconds(proc.pid)
        sent = time.monotonic()
        subprocess.run(["storescu", "-aec", "CHEXD", "127.0.0.1", str(port), *map(str, files)], check=True)
        _wait_for_reports(engine, 1 + len(files), sent + timeout)
        cpu_after = _tree_cpu_seconds(proc.pid)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT i.sop_instance_uid, i.received_at, r.finished_at, r.state FROM instances i "
                    "JOIN series s ON i.series_id = s.id JOIN study_reports r ON r.study_id = s.study_id"
                )
            ).all()
            findings = conn.execute(
                text(
                    "SELECT i.sop_instance_uid, f.label, f.status, f.region FROM findings f "
                    "JOIN predictions p ON f.prediction_id = p.id JOIN instances i ON p.instance_id = i.id"
                )
            ).all()
    finally:
        proc.terminate()
        proc.wait(30)
    from datetime import datetime

    def ts(v: object) -> float:
        return (v if isinstance(v, datetime) else datetime.fromisoformat(str(v))).timestamp()

    import pydicom

    warm_uid = str(pydicom.dcmread(warm, stop_before_pixels=True).SOPInstanceUID)
    rows = [r for r in rows if r[0] != warm_uid]
    ok = [r for r in rows if r[3] == "DONE"]
    latencies = np.array([ts(r[2]) - ts(r[1]) for r in ok])
    span = max(ts(r[2]) for r in ok) - min(ts(r[1]) for r in ok) if ok else float("nan")
    return {
        "reports": len(ok),
        "failed": len(rows) - len(ok),
        "images_per_s": len(ok) / span if ok else 0.0,
        "p50_s": float(np.percentile(latencies, 50)) if ok else None,
        "p95_s": float(np.percentile(latencies, 95)) if ok else None,
        "cpu_s_per_image": (cpu_after - cpu_before) / len(files) if cpu_before is not None and cpu_after else None,
        "findings": findings,
    }


def run_naive(files: list[Path], work: Path, model_path: Path) -> dict[str, object]:
    import pydicom
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from model.artifact import load_artifact
    from model.types import Prediction
    from reporting.compose import compose_study
    from reporting.facts import ModelFacts

    network, manifest = load_artifact(model_path)
    model = torchvision.models.densenet121(num_classes=len(manifest.labels))
    model.load_state_dict(network.state_dict(), strict=True)
    model.eval()
    size = manifest.preprocessing.input_size
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    cam = GradCAM(model=model, target_layers=[model.features[-1]])
    facts = ModelFacts(
        name="naive",
        version=manifest.version_id,
        weights_sha256=manifest.weights_sha256,
        synthetic=True,
        intended_use=manifest.intended_use,
        thresholds=dict(manifest.thresholds),
        preprocessing=manifest.preprocessing,
    )
    latencies = []
    cpu_before = time.process_time()
    start = time.monotonic()
    for n, path in enumerate(files):
        t0 = time.monotonic()
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        pixels = (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-6)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = 1.0 - pixels
        x = torch.from_numpy(pixels)[None, None]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = (x.repeat(1, 3, 1, 1) - mean) / std
        with torch.no_grad():
            logits = model(x)[0]
        probabilities = torch.sigmoid(logits).numpy()
        cams = np.zeros((len(manifest.labels), size, size), np.float32)
        for c, label in enumerate(manifest.labels):
            if probabilities[c] >= manifest.thresholds[label]:
                cams[c] = cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])[0]
        prediction = Prediction(
            labels=manifest.labels,
            probabilities=probabilities.astype(np.float32),
            logits=logits.numpy().astype(np.float32),
            cams=cams,
            top_channels=np.zeros((len(manifest.labels), 1), np.int32),
            top_contributions=np.zeros((len(manifest.labels), 1), np.float32),
            bias=logits.numpy().astype(np.float32),
            model_version=manifest.version_id,
        )
        compose_study(
            images=[(ds, pixels, prediction, facts)], revision=1, predecessors=(), folder=work / "naive" / f"{n}"
        )
        latencies.append(time.monotonic() - t0)
    span = time.monotonic() - start
    cpu = time.process_time() - cpu_before
    lat = np.array(latencies)
    return {
        "images_per_s": len(files) / span,
        "cpu_s_per_image": cpu / len(files),
        "p50_s": float(np.percentile(lat, 50)),
        "p95_s": float(np.percentile(lat, 95)),
    }


# --- --parts: compose_study's CPU by part ---------------------------------------------------------------------------

# (module, function name, part): the functions compose_study calls, wrapped with CPU timers; a nested call's time is
# taken out of its caller's part (lung fields inside the assembly, file writes inside the PDF and the SR)
PARTS = (
    ("reporting.compose", "build_sr", "SR build (highdicom)"),
    ("reporting.compose", "build_pm", "Parametric Maps"),
    ("reporting.compose", "build_sc", "heatmap SCs (render + build)"),
    ("reporting.compose", "write_pdf", "PDF (reportlab)"),
    ("reporting.compose", "build_encapsulated_pdf", "Encapsulated PDF build"),
    ("reporting.compose", "_save", "DICOM file writes"),
    ("reporting.report", "estimate_lung_fields", "lung fields"),
    ("reporting.compose", "assemble", "findings, regions, evidence"),
)


def _prepare_parts(files: list[Path], model: Path, folder: Path) -> Path:
    """Predict every file with ``model`` in this process (untimed) and pickle (path, Prediction, model facts as a
    dict) per file for :func:`_time_parts`. Returns the pickle."""
    import pickle

    from daemon.work.inference import ModelProcessor
    from daemon.work.reports import _model_facts

    processor = ModelProcessor(model, device="cpu", threads=1)
    try:
        inputs = []
        for path in files:
            result = processor(path)
            facts = _model_facts(result)
            inputs.append((str(path), result.prediction, facts.to_dict() if hasattr(facts, "to_dict") else facts))
    finally:
        processor.close()
    out = folder / "parts-inputs.pkl"
    out.write_bytes(pickle.dumps(inputs))
    return out


def _time_parts(inputs_path: Path, repeat: int) -> dict[str, object]:
    """CPU ms per study by part of ``compose_study`` (the one importable from ``sys.path``) over the pickled inputs:
    the parts of the pass (of ``repeat``) with the median total. One pass first, untimed (imports, caches)."""
    import datetime as dt
    import importlib
    import pickle
    import tempfile

    import pydicom

    from model.preprocess import decode_image

    inputs = pickle.loads(inputs_path.read_bytes())
    acc: dict[str, float] = {}
    stack: list[float] = []  # CPU time of nested timed calls, to subtract from their callers

    def wrap(module: object, name: str, part: str) -> None:
        inner = getattr(module, name)

        def timed(*args: object, **kwargs: object) -> object:
            start = time.process_time()
            stack.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                nested = stack.pop()
                acc[part] = acc.get(part, 0.0) + spent - nested
                if stack:
                    stack[-1] += spent

        setattr(module, name, timed)

    for module_name, name, part in PARTS:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            wrap(module, name, part)
    compose = importlib.import_module("reporting.compose")
    # the typed model facts (issue 17); the compose_study of a tree from before them takes the archive's dict
    typed = compose.ModelFacts.from_dict if hasattr(compose, "ModelFacts") else dict
    studies = []
    for path, prediction, facts in inputs:
        ds = pydicom.dcmread(path)
        studies.append((ds, decode_image(ds), prediction, typed(facts)))
    when = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    passes: list[dict[str, float]] = []
    positives = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat + 1):
            acc.clear()
            start = time.process_time()
            for n, (ds, image, prediction, facts) in enumerate(studies):
                composed = compose.compose_study(images=[(ds, image, prediction, facts)], revision=1, predecessors=(),
                                                 folder=Path(tmp) / f"{k}-{n}", created_at=when)
                positives += sum(1 for f in composed.findings[0] if f.status != "absent") if k == 0 else 0
            total = time.process_time() - start
            if k:
                passes.append({"total": total, **acc})
    median = sorted(passes, key=lambda p: p["total"])[len(passes) // 2]  # the pass with the median total
    parts = {name: 1000 * median.get(name, 0.0) / len(studies) for name in ["total", *(part for _, _, part in PARTS)]}
    parts["other (compose_study itself)"] = parts["total"] - sum(parts[part] for _, _, part in PARTS)
    return {"studies": len(studies), "positive_findings": positives, "cpu_ms": parts}


def run_parts(files: list[Path], model: Path, work: Path, repeat: int, baseline: Path | None) -> dict[str, object]:
    """--parts: this checkout's compose_study and, with ``baseline``, another checkout's on the same inputs, in
    alternating subprocesses (one pass each at a time would interleave too finely to matter; a subprocess per tree
    keeps each tree's modules apart)."""
    inputs = _prepare_parts(files, model, work)
    trees = {"this checkout": REPO} | ({"baseline": baseline.resolve()} if baseline else {})
    results: dict[str, object] = {}
    for name, tree in trees.items():
        out = work / f"parts-{len(results)}.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--parts-worker", str(inputs), "--tree",
                        str(tree), "--repeat", str(repeat), "--json", str(out)], check=True, cwd=tree)
        results[name] = json.loads(out.read_text())
    return results


def print_parts(results: dict[str, dict[str, object]], count: int, size: int, what: str) -> None:
    names = list(results)
    first = results[names[0]]
    print(f"\ncompose_study CPU by part, {count} single-image studies ({size} px phantoms, {what}), "
          f"{first['positive_findings']} positive findings in all (an SC and a PM each)\n")
    print("| part | " + " | ".join(f"{n} (CPU ms per study)" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for part in [*(p for _, _, p in PARTS), "other (compose_study itself)", "total"]:
        cells = [f"{results[n]['cpu_ms'][part]:.1f}" for n in names]  # type: ignore[index]
        label = f"**{part}**" if part == "total" else part
        print(f"| {label} | " + " | ".join(f"**{c}**" if part == "total" else c for c in cells) + " |")


def pointing_game(findings: list[tuple], start: int, count: int, size: int) -> dict[str, dict[str, float]]:
    """Per finding: hit rate of chexd's reported main region against the lesion mask, and of the image-centre
    baseline, over findings drawn in the phantom that chexd reported present."""
    from model.phantom import generate, to_dicom
    from model.types import LABELS
    from reporting.regions import OUTSIDE, OUTSIDE_TEXT, ZONES, estimate_lung_fields

    reported: dict[tuple[str, str], str] = {}
    for uid, label, status, region in findings:
        if status == "present" and region:
            # the stored text says the share too: "left lower zone (34% of heat)", "outside the lung fields (58% ...)"
            zone = region.split(" (")[0]
            reported[(uid, label)] = OUTSIDE if zone == OUTSIDE_TEXT else zone
    hits: dict[str, list[tuple[bool, bool]]] = {}
    for index in range(start, start + count):
        sample = generate(0, index, size=size)
        uid = str(to_dicom(sample).SOPInstanceUID)
        fields = None
        for c, label in enumerate(LABELS):
            if not sample.true_labels[c] or (uid, label) not in reported:
                continue
            fields = fields or estimate_lung_fields(sample.image)
            h, w = fields.shape
            rows = (np.arange(h) + 0.5) * size / h
            cols = (np.arange(w) + 0.5) * size / w
            mask = sample.masks[c][np.ix_(rows.astype(int), cols.astype(int))]
            covered = {ZONES[z] for z in np.unique(fields.zones[mask]) if z >= 0}
            if not covered:
                covered = {OUTSIDE}
            centre = fields.zone_at(size / 2, size / 2)
            hits.setdefault(label, []).append((reported[(uid, label)] in covered, centre in covered))
    return {
        label: {"n": len(v), "chexd": float(np.mean([a for a, _ in v])), "centre": float(np.mean([b for _, b in v]))}
        for label, v in sorted(hits.items())
    }


def _model(path: Path | None, input_size: int | None, work: Path) -> Path:
    """The artifact to run: ``path`` or the bundled demo, re-saved with ``input_size`` when one is given."""
    import dataclasses

    from daemon.store.registry import bundled_demo_model
    from model.artifact import load_artifact, save_artifact

    chosen = path or bundled_demo_model("full")
    if chosen is None:
        raise SystemExit("no model: this build ships no demo model - pass --model")
    if not input_size:
        return chosen
    network, manifest = load_artifact(chosen)
    return save_artifact(
        network,
        work / "model",
        name=f"{manifest.name}-at-{input_size}px",
        preprocessing=dataclasses.replace(manifest.preprocessing, input_size=input_size),
        intended_use="synthetic demo model, not for diagnosis - benchmark compute proxy only",
        thresholds=manifest.thresholds,
        synthetic=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", type=int, default=512, help="phantom side in pixels")
    parser.add_argument("--start", type=int, default=20000, help="first phantom index")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--model", type=Path, help="artifact to run (default: the bundled demo model)")
    parser.add_argument(
        "--input-size",
        type=int,
        help="run the model's weights at this input size instead (e.g. 224, CheXNet's): a compute proxy only - a "
        "model trained at another size gives findings of no meaning",
    )
    parser.add_argument("--parts", action="store_true",
                        help="time compose_study by part in-process instead (no daemon, no storescu)")
    parser.add_argument("--repeat", type=int, default=3, help="--parts: passes over all studies (median)")
    parser.add_argument("--baseline", type=Path, help="--parts: also time the compose_study of this checkout")
    parser.add_argument("--parts-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parts_worker:  # a subprocess of --parts: time the compose_study of --tree
        sys.path.insert(0, str(args.tree))
        for name in [m for m in sys.modules if m == "reporting" or m.startswith("reporting.")]:
            del sys.modules[name]
        args.json.write_text(json.dumps(_time_parts(args.parts_worker, args.repeat)))
        return
    if args.parts:
        busy = _busy_cpus()
        work = Path(tempfile.mkdtemp(prefix="chexd-parts-"))
        model = _model(args.model, args.input_size, work)
        from model.artifact import read_manifest

        manifest = read_manifest(model)
        files = _write_phantoms(work / "in", args.count, args.size, args.start)
        results = run_parts(files, model, work, args.repeat, args.baseline)
        shutil.rmtree(work, ignore_errors=True)
        print_parts(results, args.count, args.size,  # type: ignore[arg-type]
                    f"model {manifest.name} at {manifest.preprocessing.input_size} px")
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
              f"{load}; CPUs busy with other work just before: {busy:.2f}" if busy is not None else "")
        if args.json:
            args.json.write_text(json.dumps({"parts": results, "busy_cpus_before": busy, "load": os.getloadavg()}))
        return
    if not shutil.which("storescu"):
        raise SystemExit("storescu (dcmtk) is required: apt-get install dcmtk")
    busy = _busy_cpus()
    work = Path(tempfile.mkdtemp(prefix="chexd-bench-"))
    model = _model(args.model, args.input_size, work)
    from model.artifact import read_manifest

    manifest = read_manifest(model)
    what = f"model {manifest.name} at {manifest.preprocessing.input_size} px"
    if args.input_size:
        what += " (compute proxy: weights trained at another size)"
    files = _write_phantoms(work / "in", args.count, args.size, args.start)
    (warm,) = _write_phantoms(work / "warm", 1, args.size, args.start + args.count)
    chexd = run_chexd(files, warm, work, args.timeout, model)  # on failure the work folder (with chexd.log) is kept
    naive = run_naive(files, work, model)
    game = pointing_game(chexd.pop("findings"), args.start, args.count, args.size)  # type: ignore[arg-type]
    shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU used"
    print(f"\nEnd to end, {args.count} phantom DX images {args.size} px, {what}, CPU ({machine})\n")
    if busy is not None:
        print(f"CPUs busy with other work just before the run: {busy:.2f}\n")
    if busy is not None and busy > 0.25:
        print("WARNING: the machine was not idle - other jobs distort both pipelines (torch's worker threads in the "
              "naive one especially); rerun on an idle machine before quoting these figures\n")
    print("| pipeline | images/s | p50 latency (s) | p95 latency (s) | CPU s per image |")
    print("|---|---|---|---|---|")
    for name, r in (("chexd (storescu -> reports)", chexd), ("naive (sequential)", naive)):
        cpu = r.get("cpu_s_per_image")
        cpu_text = f"{cpu:.3f}" if isinstance(cpu, float) else "n/a"
        print(f"| {name} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {cpu_text} |")
    ratio = chexd["images_per_s"] / naive["images_per_s"]  # type: ignore[operator]
    print(f"\nthroughput ratio chexd / naive: {ratio:.1f}x (issue 15 targets, idle: >= 6 images/s with the bundled "
          "model; >= 3x the naive pipeline with the full DenseNet121 at --input-size 224)")
    print(f"reports written {chexd['reports']}, failed {chexd['failed']}\n")
    print("| finding | n | pointing game (reported region) | image-centre baseline |")
    print("|---|---|---|---|")
    for label, g in game.items():
        print(f"| {label} | {g['n']} | {g['chexd']:.2f} | {g['centre']:.2f} |")
    if args.json:
        results = {"chexd": chexd, "naive": naive, "ratio": ratio, "pointing": game, "busy_cpus_before": busy}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

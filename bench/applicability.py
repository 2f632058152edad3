"""Applicability (out-of-domain) scores on the demo models: which method separates the phantom from what it is not.

    python -m bench.applicability [--model model/demo/chexd-demo.json ...] [--fit-images 300] [--test-images 200]
                                  [--shifted-images 40] [--real-cxr DIR] [--markdown FILE] [--json]

For each model: the applicability model is fitted on the pooled features of the phantom *val* split (``--fit-images``,
the images ``chexd train`` selects on), then every method's score is computed for

- the phantom *test* split (patient-disjoint from val; in domain: the share accepted should be >= 95%),
- the real radiographs under ``--real-cxr`` (default: none; e.g. ../shared/data/real-cxr, PNG/JPEG/DICOM, recursive),
- phantom test images rotated 90°, inverted (1 - x), cropped to one lung, with heavy noise (Gaussian sigma 0.25),
- non-chest images: synthetic extremity radiographs (a hand: palm and finger bones) and the CT/MR/NM images that
  pydicom's bundled test files carry (only files present on disk; nothing is downloaded).

Per set: the share of images with at least one input-quality issue (:func:`model.quality.check_pixels` on the
pixels before resizing; photometric taken as MONOCHROME2, the orientation the pixels are in), and per method: the
share flagged out of domain (score above the threshold fitted at 95% of the val images,
cross-fitted) and the AUROC of the score, that set (positive) against the phantom test split (negative).
Methods: ``mahalanobis-pca{k}`` (subspace distance + residual, chexd's default), the same without the residual term
(``subspace-pca{k}``), ``knn5-pca{k}`` and the energy score from the logits (``-logsumexp``).
When an artifact already carries an applicability model, its rows appear as method ``artifact`` (the shipped model
and threshold). Progress to stderr, the table to stdout; ``--markdown`` writes it as a Markdown table too.

    python -m bench.applicability --fit-demo [--fit-images 1000]

refits the bundled demo manifests' applicability model (default method) on the first ``--fit-images`` phantom val
images (seed 0, 256 px: the val split ``chexd train`` selected on) and rewrites only their JSON manifests (weights
untouched; the version ids change because the applicability model is part of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("model/demo/chexd-demo.json", "model/demo/chexd-demo-compressed.json")
METHODS = ("mahalanobis-pca32", "mahalanobis-pca64", "subspace-pca32", "knn5-pca32", "energy")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _phantom_images(split: str, count: int, *, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    from model.phantom import generate, sample_labels
    from model.train import split_of

    images, index = [], 0
    while len(images) < count:
        if split_of(sample_labels(seed, index).patient_id) == split:
            images.append(generate(seed, index, size=size).image)
        index += 1
    return images


def _extremity(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A crude hand radiograph: soft-tissue palm and fingers with brighter bones, on dark air, random pose."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size), np.float32)
    cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.6, 0.75)
    angle = rng.uniform(-0.5, 0.5)

    def rod(x0: float, y0: float, length: float, width: float, theta: float) -> np.ndarray:
        dx, dy = np.sin(theta), -np.cos(theta)
        t = np.clip((xx - x0) * dx + (yy - y0) * dy, 0, length)
        d = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
        return (d < width).astype(np.float32)

    palm = (((xx - cx) / 0.16) ** 2 + ((yy - cy) / 0.2) ** 2 < 1).astype(np.float32)
    image += 0.35 * palm
    for i, offset in enumerate(np.linspace(-0.12, 0.12, 4)):
        theta = angle + offset * 1.5
        x0, y0 = cx + offset, cy - 0.15
        length = rng.uniform(0.25, 0.35) * (0.85 if i in (0, 3) else 1.0)
        image += 0.35 * rod(x0, y0, length, 0.035, theta)
        image += 0.4 * rod(x0, y0, length * 0.95, 0.016, theta)  # phalanges
        image += 0.4 * rod(x0, y0 + 0.05, 0.17, 0.014, theta + np.pi)  # metacarpal
    image += 0.35 * rod(cx - 0.16, cy, 0.22, 0.04, angle - 1.0)  # thumb
    image += 0.4 * rod(cx - 0.16, cy, 0.2, 0.018, angle - 1.0)
    image += 0.45 * rod(cx, cy + 0.15, 0.4, 0.05, angle + np.pi)  # forearm bones
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def _pydicom_images() -> list[tuple[str, np.ndarray]]:
    """CT/MR/NM single-frame images among pydicom's bundled test files present on disk (never downloaded)."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for name in ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # noqa: BLE001 - a codec may be missing; the set is then smaller, and says so
            _log(f"skipping {name}: {type(exc).__name__}: {exc}")
            continue
        if pixels.ndim != 2 or min(pixels.shape) < 64:
            continue
        lo, hi = np.percentile(pixels, [0.5, 99.5])
        out.append((f"{name} ({ds.get('Modality', '?')})", np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1)))
    return out


def _real_images(folder: Path | None) -> list[np.ndarray]:
    from model.preprocess import decode_file

    if folder is None:
        return []
    images = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm") and path.is_file():
            images.append(decode_file(path))
    return images


def build_sets(args: argparse.Namespace) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """(phantom val images to fit on, {set name: images}); the first set is the in-domain phantom test split."""
    _log(f"rendering {args.fit_images} phantom val + {args.test_images} phantom test images (256 px)")
    fit = _phantom_images("val", args.fit_images)
    test = _phantom_images("test", args.test_images)
    rng = np.random.default_rng(0)
    base = test[: args.shifted_images]
    s = base[0].shape[0]
    sets: dict[str, list[np.ndarray]] = {"phantom test (in domain)": test}
    real = _real_images(args.real_cxr)
    if real:
        sets[f"real radiographs ({args.real_cxr.name})"] = real
    sets["phantom rotated 90°"] = [np.ascontiguousarray(np.rot90(x)) for x in base]
    sets["phantom inverted"] = [1.0 - x for x in base]
    sets["phantom cropped to one lung"] = [
        np.ascontiguousarray(x[int(0.12 * s) : int(0.8 * s), int(0.08 * s) : int(0.5 * s)]) for x in base
    ]
    sets["phantom heavy noise (σ 0.25)"] = [
        np.clip(x + rng.normal(0, 0.25, x.shape).astype(np.float32), 0, 1) for x in base
    ]
    sets["synthetic extremity (hand)"] = [_extremity(rng) for _ in range(20)]
    dicom = _pydicom_images()
    if dicom:
        sets[f"pydicom CT/MR/NM ({len(dicom)})"] = [x for _, x in dicom]
    return fit, sets


def _outputs(engine: Any, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from model.engine import prepare

    pooled, logits = [], []
    for start in range(0, len(images), 32):
        batch = torch.stack([prepare(x.astype(np.float32), engine.recipe) for x in images[start : start + 32]])
        out = engine.forward(batch)
        pooled.append(out.pooled.numpy())
        logits.append(out.logits.numpy())
    return np.concatenate(pooled), np.concatenate(logits)


def _scorers(fit_pooled: np.ndarray, fit_logits: np.ndarray) -> dict[str, tuple[Any, float]]:
    """method -> (score function of (pooled, logits), threshold at 95% of the val images)."""
    from scipy.special import logsumexp

    from model.applicability import fit_applicability

    scorers: dict[str, tuple[Any, float]] = {}
    for method in METHODS:
        if method == "energy":
            scores = -logsumexp(fit_logits, axis=1)
            scorers[method] = (lambda p, g: -logsumexp(g, axis=1), float(np.quantile(scores, 0.95, method="higher")))
            continue
        if method.startswith("subspace"):
            model = fit_applicability(fit_pooled, method=method.replace("subspace", "mahalanobis"))

            def subspace(p: np.ndarray, g: np.ndarray, m: Any = model) -> np.ndarray:
                z = (p.astype(np.float64) - m.mean) @ m.components.T.astype(np.float64)
                return ((z**2) / m.variances).sum(1)

            # the same cross-fitted rule would need a refit per fold; in-sample quantile (optimistic, stated)
            scorers[method] = (subspace, float(np.quantile(subspace(fit_pooled, fit_logits), 0.95, method="higher")))
            continue
        model = fit_applicability(fit_pooled, method=method)
        scorers[method] = (lambda p, g, m=model: m.score(p), model.threshold)
    return scorers


def quality_shares(sets: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Set name -> share of its images with at least one quality issue."""
    from model.quality import check_pixels

    return {
        name: float(np.mean([bool(check_pixels(x, photometric="MONOCHROME2")) for x in images]))
        for name, images in sets.items()
    }


def run_model(path: Path, fit: list[np.ndarray], sets: dict[str, list[np.ndarray]]) -> list[dict[str, Any]]:
    from sklearn.metrics import roc_auc_score

    from model.artifact import load_artifact
    from model.engine import Engine

    network, manifest = load_artifact(path)
    engine = Engine(network, recipe=manifest.preprocessing, labels=manifest.labels, model_version="bench", device="cpu")
    t0 = time.perf_counter()
    fit_pooled, fit_logits = _outputs(engine, fit)
    outputs = {name: _outputs(engine, images) for name, images in sets.items()}
    _log(
        f"{manifest.name}: features of {len(fit) + sum(map(len, sets.values()))} images in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    scorers = _scorers(fit_pooled, fit_logits)
    if manifest.applicability is not None:
        shipped = manifest.applicability
        scorers = {"artifact": (lambda p, g: shipped.score(p), shipped.threshold)} | scorers
    reference = "phantom test (in domain)"
    rows = []
    for method, (score, threshold) in scorers.items():
        base = score(*outputs[reference])
        for name, (pooled, logits) in outputs.items():
            values = score(pooled, logits)
            auroc = None
            if name != reference:
                y = np.r_[np.zeros(len(base)), np.ones(len(values))]
                auroc = float(roc_auc_score(y, np.r_[base, values]))
            rows.append(
                {
                    "model": manifest.name,
                    "method": method,
                    "set": name,
                    "images": len(values),
                    "flagged": float(np.mean(values > threshold)),
                    "auroc": auroc,
                }
            )
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | set | images | flagged out of domain | AUROC vs phantom test | quality issue |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        auroc = "—" if r["auroc"] is None else f"{r['auroc']:.3f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['set']} | {r['images']} | {r['flagged']:.0%} | {auroc} "
            f"| {r['quality_issue']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def fit_demo(count: int) -> None:
    """Refit the demo manifests' applicability model on ``count`` phantom val images; rewrite the JSON only."""
    from model.artifact import Manifest, load_artifact
    from model.train import fit_applicability_on, render_split

    for relative in DEFAULT_MODELS:
        path = REPO_ROOT / relative
        network, manifest = load_artifact(path)
        _log(f"{manifest.name}: rendering {count} phantom val images")
        val = render_split("val", seed=0, count=count, recipe=manifest.preprocessing, render_size=256)
        model = fit_applicability_on(network, val.x, source=f"phantom val split (seed 0, {count} images, 256 px)")
        data = json.loads(path.read_text(encoding="utf-8"))
        data["applicability"] = model.to_dict()
        new = Manifest.from_dict(data)  # validates
        path.write_text(json.dumps(new.to_dict(), sort_keys=True, indent=2) + "\n", encoding="utf-8")
        _log(f"{manifest.name}: {model.summary()} -> version {manifest.version_id} -> {new.version_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", type=Path, help="artifact(s); default: both demo models")
    parser.add_argument("--fit-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--shifted-images", type=int, default=40)
    parser.add_argument("--real-cxr", type=Path, default=None, help="folder of real chest radiographs (recursive)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fit-demo", action="store_true", help="refit the bundled demo manifests' model and exit")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.fit_demo:
        fit_demo(args.fit_images)
        return 0
    models = args.model or [REPO_ROOT / p for p in DEFAULT_MODELS]
    t0 = time.perf_counter()
    fit, sets = build_sets(args)
    quality = quality_shares(sets)
    rows = []
    for path in models:
        rows.extend(run_model(path, fit, sets))
    for row in rows:
        row["quality_issue"] = quality[row["set"]]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"applicability scores (fit: {len(fit)} phantom val images; threshold at 95%)")
        for column in ("model", "method", "set", "images", "flagged", "AUROC", "quality issue"):
            table.add_column(column, justify="left" if column in ("model", "method", "set") else "right")
        for r in rows:
            table.add_row(
                r["model"],
                r["method"],
                r["set"],
                str(r["images"]),
                f"{r['flagged']:.0%}",
                "—" if r["auroc"] is None else f"{r['auroc']:.3f}",
                f"{r['quality_issue']:.0%}",
            )
        Console(width=140).print(table)
    if args.markdown:
        args.markdown.write_text(_markdown(rows), encoding="utf-8")
    _log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

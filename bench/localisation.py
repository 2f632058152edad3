"""Heatmap localisation on the chest phantom: pointing game and IoU of the model's CAMs against the lesion masks,
beside baselines that know nothing of the image, in the same run.

    python -m bench.localisation [--count 400] [--seed 0] [--render-size 256] [--model PATH] [--json]

Images: the first ``--count`` phantom images of series ``--seed`` whose patient falls in the TEST split
(``model.train.split_of``; the bundled demo model was trained on series 0's train split, so these patients are
unseen), rendered at ``--render-size`` px with their lesion masks (``model.phantom.generate``). For every finding
drawn in an image (``true_labels``; the masks are of what is drawn, not of the noisy labels) with a non-empty mask,
the engine's CAM of that class (one forward pass, ``model.engine.Engine``) is scored with
``model.localisation``:

- pointing game: the CAM's peak (upsampled to the mask grid) lies in the mask (within ``--tolerance-px``);
- IoU: the ReLU'd upsampled CAM binarised at ``--threshold-fraction`` of its maximum, against the mask.

Baselines, scored on the same (image, finding) pairs:

- centre: the image centre as the point; for IoU, a centred Gaussian heat map (sigma = 1/4 of the side) binarised
  the same way;
- random point in the thorax: the expected hit rate of a uniformly random point in the chest cavity (both lung
  fields and the mediastinum, ``PhantomSample.thorax``), computed exactly as |mask within tolerance| / |thorax|;
  for IoU the whole thorax as the region;
- other-class CAM: the same image's CAMs of the 13 other classes (mean), i.e. how much of the hit rate is the
  class's own evidence rather than "where this model looks anyway".

Rows: one per finding with at least one instance, then "all" (pooled over instances) and "mean of findings".
The demo model sees 128-px inputs, so its CAMs are 4x4 cells of 64 px on a 256-px mask grid. Progress goes to
stderr, the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.localisation import cam_iou, point_hits, pointing_game, region_iou
from model.types import LABELS, PreprocessRecipe

_BASELINE_SIGMA = 0.25  # centre baseline's Gaussian sigma, fraction of the image side


@dataclass(kw_only=True, slots=True)
class _Scores:
    """Per-instance scores of one finding (lists grow as images are scored)."""

    hit: list[bool] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    centre_hit: list[bool] = field(default_factory=list)
    centre_iou: list[float] = field(default_factory=list)
    random_hit: list[float] = field(default_factory=list)  # expected hit rate of a uniform point in the thorax
    thorax_iou: list[float] = field(default_factory=list)
    other_hit: list[float] = field(default_factory=list)  # mean over the other classes' CAMs
    other_iou: list[float] = field(default_factory=list)
    area: list[float] = field(default_factory=list)  # mask area / thorax area

    def row(self, name: str) -> dict[str, object]:
        def mean(values: list[float] | list[bool]) -> float:
            return float(np.mean(values)) if values else float("nan")

        return {
            "finding": name,
            "n": len(self.hit),
            "mask_fraction_of_thorax": mean(self.area),
            "pointing": {"cam": mean(self.hit), "centre": mean(self.centre_hit), "random_thorax": mean(self.random_hit),
                         "other_class_cam": mean(self.other_hit)},
            "iou": {"cam": mean(self.iou), "centre_gaussian": mean(self.centre_iou), "thorax": mean(self.thorax_iou),
                    "other_class_cam": mean(self.other_iou)},
        }

    def extend(self, other: _Scores) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))


def _field_of_view(recipe: PreprocessRecipe, size: int) -> slice:
    """The rows (= columns) of a square ``size`` image that the network sees after resize + centre crop."""
    side = recipe.resize or recipe.input_size
    if side <= recipe.input_size:
        return slice(0, size)
    top = (side - recipe.input_size) // 2
    return slice(round(top * size / side), round((top + recipe.input_size) * size / side))


def _centre_heat(size: int) -> np.ndarray:
    axis = (np.arange(size) + 0.5) / size - 0.5
    return np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * _BASELINE_SIGMA**2))


def _expected_random_hit(mask: np.ndarray, thorax: np.ndarray, tolerance_px: float) -> float:
    if tolerance_px > 0:
        from scipy import ndimage

        mask = ndimage.distance_transform_edt(~mask) <= tolerance_px
    return float((mask & thorax).sum() / thorax.sum())


def _score_image(cams: np.ndarray, masks: np.ndarray, thorax: np.ndarray, present: np.ndarray,
                 centre_heat: np.ndarray, *, tolerance_px: float, fraction: float, scores: list[_Scores]) -> None:
    size = masks.shape[-1]
    centre = (size // 2, size // 2)
    for c in np.flatnonzero(present):
        mask = masks[c]
        s = scores[c]
        s.hit.append(pointing_game(cams[c], mask, tolerance_px=tolerance_px))
        s.iou.append(cam_iou(cams[c], mask, threshold_fraction=fraction))
        s.centre_hit.append(point_hits(centre, mask, tolerance_px=tolerance_px))
        s.centre_iou.append(cam_iou(centre_heat, mask, threshold_fraction=fraction))
        s.random_hit.append(_expected_random_hit(mask, thorax, tolerance_px))
        s.thorax_iou.append(region_iou(thorax, mask))
        others = [k for k in range(len(cams)) if k != c]
        s.other_hit.append(float(np.mean([pointing_game(cams[k], mask, tolerance_px=tolerance_px) for k in others])))
        s.other_iou.append(float(np.mean([cam_iou(cams[k], mask, threshold_fraction=fraction) for k in others])))
        s.area.append(float(mask.sum() / thorax.sum()))


def run(*, model_path: Path | None, count: int, seed: int, render_size: int, tolerance_px: float,
        fraction: float, batch_size: int = 16) -> dict[str, object]:
    import torch

    from model.artifact import load_artifact
    from model.engine import Engine
    from model.phantom import generate, sample_labels
    from model.train import split_of

    torch.set_num_threads(2)
    if model_path is None:
        from daemon.store.registry import bundled_demo_model

        model_path = bundled_demo_model("full")
        if model_path is None:
            raise SystemExit("no bundled demo model in this build - pass --model")
    network, manifest = load_artifact(model_path)
    if tuple(manifest.labels) != LABELS:
        raise SystemExit(f"{model_path}: labels {manifest.labels} are not chexd's 14 findings in CheXNet order")
    engine = Engine(network, recipe=manifest.preprocessing, labels=manifest.labels, model_version=manifest.version_id,
                    device="cpu", batch_size=batch_size)
    fov = _field_of_view(manifest.preprocessing, render_size)
    centre_heat = _centre_heat(fov.stop - fov.start)
    scores = [_Scores() for _ in LABELS]
    started = time.perf_counter()
    pending: list = []
    done, index, cam_shape = 0, 0, None

    def flush() -> None:
        nonlocal done, cam_shape
        predictions = engine.predict([sample.image for sample in pending])
        for sample, prediction in zip(pending, predictions, strict=True):
            cam_shape = prediction.cams.shape[1:]
            masks = sample.masks[:, fov, fov]
            thorax = sample.thorax[fov, fov]
            present = (sample.true_labels == 1) & masks.any(axis=(1, 2))
            _score_image(prediction.cams, masks, thorax, present, centre_heat, tolerance_px=tolerance_px,
                         fraction=fraction, scores=scores)
        done += len(pending)
        pending.clear()
        print(f"scored {done}/{count} images ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    while done + len(pending) < count:
        if split_of(sample_labels(seed, index).patient_id) == "test":
            pending.append(generate(seed, index, size=render_size))
            if len(pending) == batch_size:
                flush()
        index += 1
    if pending:
        flush()

    rows = [scores[c].row(name) for c, name in enumerate(LABELS) if scores[c].hit]
    pooled = _Scores()
    for s in scores:
        pooled.extend(s)
    macro = {
        "finding": "mean of findings",
        "n": sum(r["n"] for r in rows),
        "mask_fraction_of_thorax": float(np.mean([r["mask_fraction_of_thorax"] for r in rows])),
        "pointing": {k: float(np.mean([r["pointing"][k] for r in rows])) for k in rows[0]["pointing"]},
        "iou": {k: float(np.mean([r["iou"][k] for r in rows])) for k in rows[0]["iou"]},
    }
    return {
        "model": manifest.name,
        "model_version": manifest.version_id,
        "synthetic_model": manifest.synthetic,
        "input_size": manifest.preprocessing.input_size,
        "cam_shape": list(cam_shape) if cam_shape else None,
        "images": done,
        "phantom": {"seed": seed, "split": "test", "render_size": render_size, "last_index": index - 1},
        "tolerance_px": tolerance_px,
        "threshold_fraction": fraction,
        "rows": rows + [pooled.row("all"), macro],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 2,
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def _table(result: dict[str, object]) -> str:
    lines = [
        f"model {result['model']} ({result['model_version']}{', SYNTHETIC demo' if result['synthetic_model'] else ''}),"
        f" input {result['input_size']} px, CAM {result['cam_shape']}; {result['images']} phantom test images "
        f"(seed {result['phantom']['seed']}, {result['phantom']['render_size']} px); pointing tolerance "
        f"{result['tolerance_px']} px; IoU threshold {result['threshold_fraction']} x max",
        "",
        "| finding | n | mask/thorax | point: CAM | centre | random in thorax | other-class CAM "
        "| IoU: CAM | centre Gaussian | thorax | other-class CAM |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        p, i = r["pointing"], r["iou"]
        name = f"**{r['finding']}**" if r["finding"] in ("all", "mean of findings") else r["finding"]
        lines.append(
            f"| {name} | {r['n']} | {r['mask_fraction_of_thorax']:.2f} | {p['cam']:.2f} | {p['centre']:.2f} "
            f"| {p['random_thorax']:.2f} | {p['other_class_cam']:.2f} | {i['cam']:.2f} | {i['centre_gaussian']:.2f} "
            f"| {i['thorax']:.2f} | {i['other_class_cam']:.2f} |"
        )
    lines.append("")
    lines.append(f"{result['seconds']} s on {result['machine']['cpu']}, torch {result['machine']['torch']}, 2 threads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=400, help="phantom test images (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="phantom series (default 0, the demo model's)")
    parser.add_argument("--render-size", type=int, default=256, help="phantom size in px (default 256)")
    parser.add_argument("--model", type=Path, default=None, help="artifact manifest (default: the bundled demo)")
    parser.add_argument("--tolerance-px", type=float, default=0.0, help="pointing tolerance in mask px (default 0)")
    parser.add_argument("--threshold-fraction", type=float, default=0.5, help="IoU binarisation (default 0.5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: see bench/engine_speed.py
    if args.count < 1 or args.tolerance_px < 0 or not 0 < args.threshold_fraction <= 1:
        parser.error("--count must be >= 1, --tolerance-px >= 0, --threshold-fraction in (0, 1]")
    result = run(model_path=args.model, count=args.count, seed=args.seed, render_size=args.render_size,
                 tolerance_px=args.tolerance_px, fraction=args.threshold_fraction)
    print(json.dumps(result, indent=2) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Derive the compact NIH ChestX-ray14 table that the chest phantom samples from (``model/data/nih_label_table.npz``).

    python -m bench.derive_nih_tables [--nih ../shared/data/nih] [--out model/data/nih_label_table.npz]

Inputs (public domain, NIH Clinical Center, as distributed inside torchxrayvision 1.5.x):
``Data_Entry_2017_v2020.csv.gz`` (112,120 images) and ``BBox_List_2017.csv.gz`` (984 boxes, 1024-px coordinates).

The output holds only aggregate statistics, no image names or patient IDs:

- ``labels`` [14]: the CheXNet label order (model.types.LABELS); bit i of a mask is ``labels[i]``.
- ``combo_mask`` uint16 [K]: every distinct label combination seen (0 = "No Finding"), and
  ``combo_count`` int32 [K, 2]: how many PA (column 0) and AP (column 1) images carry it.
- ``patient_image_counts`` int32 [M + 1]: how many patients have n images (index n).
- ``age_hist`` int32 [2, 101]: images per patient age in years (0..100, clipped), row 0 male, row 1 female.
- ``bbox_label`` uint8 [B], ``bbox`` float32 [B, 4]: each box's finding (index into labels; "Infiltrate" in the box
  file is "Infiltration") and its (x, y, w, h) divided by 1024 (top-left corner, width, height; image x runs to the
  patient's left).
- ``follow_up_same_combo``: fraction of a patient's follow-up images (Follow-up # > the first) whose combination equals
  the patient's first image's.
- ``source_sha256`` [2]: sha256 of the two input files; ``n_images``, ``n_patients``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.types import LABELS  # noqa: E402

DATA_ENTRY = "Data_Entry_2017_v2020.csv.gz"
BBOX_LIST = "BBox_List_2017.csv.gz"
_BOX_NAMES = {"Infiltrate": "Infiltration"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as fh:
        return list(csv.reader(io.StringIO(fh.read())))


def _mask(findings: str) -> int:
    mask = 0
    for name in findings.split("|"):
        if name == "No Finding":
            continue
        if name not in LABELS:
            raise ValueError(f"unknown finding {name!r} in {DATA_ENTRY}")
        mask |= 1 << LABELS.index(name)
    return mask


def derive(nih: Path) -> dict[str, np.ndarray]:
    entry_path, bbox_path = nih / DATA_ENTRY, nih / BBOX_LIST
    rows = _rows(entry_path)
    header, rows = rows[0], rows[1:]
    col = {name: header.index(name) for name in ("Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                                  "Patient Gender", "View Position")}
    combos: Counter[tuple[int, str]] = Counter()
    ages = np.zeros((2, 101), dtype=np.int32)
    patients: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row in rows:
        mask = _mask(row[col["Finding Labels"]])
        view = row[col["View Position"]]
        if view not in ("PA", "AP"):
            raise ValueError(f"unexpected View Position {view!r}")
        combos[(mask, view)] += 1
        sex = row[col["Patient Gender"]]
        ages[0 if sex == "M" else 1, min(max(int(row[col["Patient Age"]]), 0), 100)] += 1
        patients[row[col["Patient ID"]]].append((int(row[col["Follow-up #"]]), mask))

    masks = sorted({m for m, _ in combos})
    counts = np.array([[combos[(m, "PA")], combos[(m, "AP")]] for m in masks], dtype=np.int32)
    per_patient = Counter(len(v) for v in patients.values())
    patient_counts = np.zeros(max(per_patient) + 1, dtype=np.int32)
    for n, c in per_patient.items():
        patient_counts[n] = c
    same = total = 0
    for images in patients.values():
        images.sort()
        for _, m in images[1:]:
            total += 1
            same += m == images[0][1]

    boxes = _rows(bbox_path)[1:]
    bbox_label = np.array([LABELS.index(_BOX_NAMES.get(r[1], r[1])) for r in boxes], dtype=np.uint8)
    bbox = np.array([[float(v) for v in r[2:6]] for r in boxes], dtype=np.float64) / 1024.0

    return {
        "labels": np.array(LABELS),
        "combo_mask": np.array(masks, dtype=np.uint16),
        "combo_count": counts,
        "patient_image_counts": patient_counts,
        "age_hist": ages,
        "bbox_label": bbox_label,
        "bbox": bbox.astype(np.float32),
        "follow_up_same_combo": np.float64(same / total),
        "source_files": np.array([DATA_ENTRY, BBOX_LIST]),
        "source_sha256": np.array([_sha256(entry_path), _sha256(bbox_path)]),
        "n_images": np.int64(len(rows)),
        "n_patients": np.int64(len(patients)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nih", type=Path, default=REPO.parent / "shared" / "data" / "nih")
    parser.add_argument("--out", type=Path, default=REPO / "model" / "data" / "nih_label_table.npz")
    args = parser.parse_args(argv)
    for name in (DATA_ENTRY, BBOX_LIST):
        if not (args.nih / name).is_file():
            print(f"error: {args.nih / name} not found - pass --nih DIR holding {DATA_ENTRY} and {BBOX_LIST}",
                  file=sys.stderr)
            return 2
    table = derive(args.nih)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **table)
    print(f"{args.out}: {args.out.stat().st_size} bytes; {int(table['n_images'])} images, "
          f"{int(table['n_patients'])} patients, {len(table['combo_mask'])} label combinations, "
          f"{len(table['bbox'])} boxes, follow-up same combination {float(table['follow_up_same_combo']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Derive the pair statistics behind the report's mutual-exclusivity rules (``reporting/data/exclusions.json``).

    python -m bench.derive_exclusions [--nih ../shared/data/nih] [--out reporting/data/exclusions.json]
                                      [--bootstrap 2000] [--seed 0]

Input: ``Data_Entry_2017_v2020.csv.gz`` (NIH ChestX-ray14, 112,120 images, public domain). For each of the 91 pairs
(A, B) of the 14 findings, over images:

- ``n_a``, ``n_b``, ``n_ab``: images labelled A, B, both; ``n``: all images.
- ``lift`` = P(A, B) / (P(A) P(B)) = n_ab * n / (n_a * n_b); 1 = independent, < 1 = seen together less than chance.
- ``lift_ci``: 95% percentile interval of the lift from a bootstrap over **patients** (images of one patient are not
  independent: follow-ups repeat labels), ``--bootstrap`` resamples; when ``n_ab`` < 5 the interval is instead the
  exact Poisson (Garwood) interval of ``n_ab`` divided by the expected count n_a n_b / n (the bootstrap cannot
  bound a count of 0 away from 0).
- ``jaccard`` = n_ab / (n_a + n_b - n_ab).

The output holds aggregates only (no image names, no patient IDs) and its provenance: the source file name and
sha256, row and patient counts, the date, the script and its parameters. Re-running with the same inputs and seed
gives the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.types import LABELS  # noqa: E402

DATA_ENTRY = "Data_Entry_2017_v2020.csv.gz"
_SMALL_COUNT = 5


def _patient_counts(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Per patient: number of images [P], and per-pair joint counts [P, 14, 14] (diagonal = single counts)."""
    with gzip.open(path, "rt", newline="") as fh:
        rows = list(csv.reader(io.StringIO(fh.read())))
    header, rows = rows[0], rows[1:]
    c_find, c_pat = header.index("Finding Labels"), header.index("Patient ID")
    index = {name: i for i, name in enumerate(LABELS)}
    patients: dict[str, int] = {}
    images = []
    joint = []
    for row in rows:
        bits = np.zeros(len(LABELS), dtype=np.int64)
        for name in row[c_find].split("|"):
            if name == "No Finding":
                continue
            if name not in index:
                raise ValueError(f"unknown finding {name!r} in {DATA_ENTRY}")
            bits[index[name]] = 1
        p = patients.setdefault(row[c_pat], len(patients))
        if p == len(images):
            images.append(0)
            joint.append(np.zeros((len(LABELS), len(LABELS)), dtype=np.int64))
        images[p] += 1
        joint[p] += np.outer(bits, bits)
    return np.array(images, dtype=np.int64), np.stack(joint), len(rows)


def _poisson_interval(k: int, level: float = 0.95) -> tuple[float, float]:
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.chi2.ppf(alpha / 2, 2 * k) / 2)
    high = float(stats.chi2.ppf(1 - alpha / 2, 2 * k + 2) / 2)
    return low, high


def derive(path: Path, *, n_bootstrap: int = 2000, seed: int = 0) -> dict[str, object]:
    images, joint, n_rows = _patient_counts(path)
    n = int(images.sum())
    total = joint.sum(axis=0)  # [14, 14]
    n_patients = len(images)
    rng = np.random.default_rng(seed)
    flat = joint.reshape(n_patients, -1).astype(np.float64)
    boot_lift = np.empty((n_bootstrap, len(LABELS), len(LABELS)))
    for b in range(n_bootstrap):
        w = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients)).astype(np.float64)
        nb = float(w @ images)
        jb = (w @ flat).reshape(len(LABELS), len(LABELS))
        single = np.diag(jb)
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_lift[b] = jb * nb / np.outer(single, single)
    pairs = []
    for a in range(len(LABELS)):
        for b in range(a + 1, len(LABELS)):
            n_a, n_b, n_ab = int(total[a, a]), int(total[b, b]), int(total[a, b])
            expected = n_a * n_b / n
            lift = n_ab / expected
            if n_ab < _SMALL_COUNT:
                low, high = _poisson_interval(n_ab)
                ci = (low / expected, high / expected)
                method = "poisson-exact"
            else:
                lo, hi = np.nanpercentile(boot_lift[:, a, b], [2.5, 97.5])
                ci = (float(lo), float(hi))
                method = "patient-bootstrap"
            pairs.append(
                {
                    "a": LABELS[a],
                    "b": LABELS[b],
                    "n_a": n_a,
                    "n_b": n_b,
                    "n_ab": n_ab,
                    "expected_ab": round(expected, 3),
                    "lift": round(lift, 4),
                    "lift_ci": [round(ci[0], 4), round(ci[1], 4)],
                    "ci_method": method,
                    "jaccard": round(n_ab / (n_a + n_b - n_ab), 5),
                }
            )
    return {
        "description": "Pairwise co-occurrence of the 14 NIH ChestX-ray14 findings over images: counts, lift "
        "P(A,B)/(P(A)P(B)) with a 95% CI, Jaccard. Aggregates only.",
        "labels": list(LABELS),
        "n_images": n,
        "pairs": pairs,
        "provenance": {
            "source_file": path.name,
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source": "NIH Clinical Center ChestX-ray14 (Wang et al., CVPR 2017), public domain; as distributed "
            "inside torchxrayvision 1.5.x",
            "rows": n_rows,
            "patients": n_patients,
            "derived_on": dt.date.today().isoformat(),
            "script": "bench/derive_exclusions.py",
            "parameters": {"bootstrap": n_bootstrap, "seed": seed, "level": 0.95, "small_count": _SMALL_COUNT},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nih", type=Path, default=REPO.parent / "shared" / "data" / "nih")
    parser.add_argument("--out", type=Path, default=REPO / "reporting" / "data" / "exclusions.json")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    source = args.nih / DATA_ENTRY
    if not source.is_file():
        print(f"error: {source} not found - pass --nih DIR holding {DATA_ENTRY}", file=sys.stderr)
        return 2
    if args.bootstrap < 100:
        print(f"error: --bootstrap {args.bootstrap} is too few for a 95% interval - use >= 100", file=sys.stderr)
        return 2
    table = derive(source, n_bootstrap=args.bootstrap, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    pairs = sorted(table["pairs"], key=lambda p: p["lift"])  # type: ignore[arg-type, index]
    print(f"{args.out}: {table['n_images']} images, {len(pairs)} pairs; lowest lifts:")
    for p in pairs[:8]:
        print(f"  {p['a']:>18} - {p['b']:<18} lift {p['lift']:.3f}  95% CI {p['lift_ci'][0]:.3f}-"
              f"{p['lift_ci'][1]:.3f}  n_ab {p['n_ab']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

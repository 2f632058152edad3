"""``chexd phantom``: write synthetic chest phantom images as CR/DX DICOM files plus a labels CSV.

Registered in daemon/cli/root.py as ``app.command("phantom")(phantom)``. The images come from ``model.phantom`` and are
synthetic (ImageComments says so); they are not patient data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.console import err, fail
from daemon.cli.progress import counter
from model.types import LABELS

__all__ = ["LABELS_CSV", "phantom"]

LABELS_CSV = "labels.csv"
_MIN_SIZE, _MAX_SIZE = 64, 4096


def phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write the DICOM files and labels.csv into (created).")],
    count: Annotated[int, typer.Option(help="Number of images to write (>= 1).")] = 10,
    seed: Annotated[int, typer.Option(help="Phantom series seed (>= 0); same seed and index, same image.")] = 0,
    size: Annotated[int, typer.Option(help=f"Image side in pixels ({_MIN_SIZE}..{_MAX_SIZE}).")] = 512,
    modality: Annotated[str, typer.Option(help="DX (Digital X-Ray For Presentation) or CR.")] = "DX",
    start: Annotated[int, typer.Option(help="First phantom index (>= 0).")] = 0,
) -> None:
    """Write COUNT synthetic chest radiographs (phantom indices START..START+COUNT-1) as DICOM, plus labels.csv.

    Each image is its own study (a patient's follow-ups are separate studies of one PatientID). labels.csv has one
    row per file: file, index, sop_instance_uid, patient_id and the 14 NLP-like (noisy) labels, 0/1. Existing files
    of the same names are overwritten. SYNTHETIC PHANTOM - NOT A PATIENT.
    """
    from model.phantom import generate, to_dicom  # scipy: only when the command runs

    if count < 1:
        fail(f"invalid --count {count} - must be >= 1", 2)
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        fail(f"invalid --size {size} - must be in {_MIN_SIZE}..{_MAX_SIZE} pixels", 2)
    if seed < 0:
        fail(f"invalid --seed {seed} - must be >= 0", 2)
    if start < 0:
        fail(f"invalid --start {start} - must be >= 0", 2)
    modality = modality.upper()
    if modality not in ("DX", "CR"):
        fail(f"invalid --modality {modality!r} - expected DX or CR", 2)
    if out.exists() and not out.is_dir():
        fail(f"{out} exists and is not a folder", 2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc.strerror or exc}", 2)

    rows: list[list[object]] = []
    progress = counter("phantom")
    try:
        with progress:
            task = progress.add_task("phantom", total=count)
            for index in range(start, start + count):
                sample = generate(seed, index, size=size)
                ds = to_dicom(sample, modality=modality)
                name = f"PH{seed}-{index:08d}.dcm"
                ds.save_as(out / name, enforce_file_format=True)
                rows.append([name, index, ds.SOPInstanceUID, sample.patient_id, *(int(v) for v in sample.labels)])
                progress.advance(task)
        tmp = out / f".{LABELS_CSV}.tmp"
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "index", "sop_instance_uid", "patient_id", *LABELS])
            writer.writerows(rows)
        os.replace(tmp, out / LABELS_CSV)
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror or exc}")
    err.print(
        f"wrote {count} {modality} images ({size}x{size}, seed {seed}, indices {start}..{start + count - 1}) "
        f"and {LABELS_CSV} to {out} - synthetic phantoms, not patient data",
        highlight=False,
    )

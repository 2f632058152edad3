"""Labelled chest radiographs for validation: a phantom split, a ChestX-ray14 folder, a DICOM folder + labels CSV.

Every source knows its ``ids``, ``patients`` and ``labels`` (uint8 [N, 14] in ``model.types.LABELS`` order) before
any pixel is decoded, so splits can be chosen first; iterating it yields :class:`LabelledItem` with the decoded image
(float32 [H, W] in [0, 1], bright = dense; PNG/JPEG and DICOM through ``model.preprocess``, whose
ImageDecodeError names the file). Label CSVs (``read_label_csv``) are either NIH style (an id column, a
``Finding Labels`` column joined by ``|``, 'No Finding' = all absent) or one 0/1 column per finding; a patient column
is optional. Plain csv + numpy (no pandas); ``.gz`` files are read transparently.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import ModelError
from model.types import LABELS

__all__ = [
    "ChestXray14Folder",
    "DatasetError",
    "DicomFolder",
    "LabelTable",
    "LabelledItem",
    "LabelledSource",
    "PhantomSource",
    "finding_index",
    "open_text",
    "patient_disjoint_halves",
    "read_label_csv",
    "split_kind",
]

_N = len(LABELS)
ID_COLUMNS = ("Image Index", "image_id", "ImageID", "image", "SOPInstanceUID", "sop_instance_uid", "file",
              "filename", "file_name", "path", "id")
PATIENT_COLUMNS = ("Patient ID", "patient_id", "PatientID", "patient")
FINDINGS_COLUMN = "Finding Labels"
NO_FINDING = "No Finding"


class DatasetError(ModelError, ValueError):
    """A validation data source is unusable: missing folder or file, missing columns, unknown finding names, listed
    images that are not there. The message names the file and says what to fix."""


def _key(name: str) -> str:
    return re.sub(r"[\s_\-#]+", "", name).lower()


_FINDING_KEYS = {_key(label): i for i, label in enumerate(LABELS)}


def finding_index(name: str) -> int | None:
    """Position of a finding name in ``LABELS``, ignoring case, spaces, '_' and '-'; None when unknown."""
    return _FINDING_KEYS.get(_key(name))


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, gunzipping it when it starts with the gzip magic bytes."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file (optionally gzipped). Raises DatasetError for an empty file or ragged rows."""
    with open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path}: empty file - expected a header row") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not a readable CSV file ({exc})") from None
        try:
            rows = [row for row in reader if row]
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: not a readable CSV file ({exc})") from None
    bad = [i + 2 for i, row in enumerate(rows) if len(row) < len(header)]
    if bad:
        raise DatasetError(
            f"{path}: {len(bad)} row(s) have fewer than the header's {len(header)} columns (line {bad[0]} first)"
        )
    return header, rows


def find_column(header: Sequence[str], candidates: Sequence[str]) -> int | None:
    """Index of the first header that matches one of ``candidates`` (ignoring case, spaces and '_')."""
    keys = [_key(h) for h in header]
    for name in candidates:
        if _key(name) in keys:
            return keys.index(_key(name))
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelTable:
    """Labels read from a CSV: ``ids`` (the id column's strings), ``patients`` (None where unknown), ``labels``
    uint8 [N, 14] in LABELS order; ``id_column`` and ``path`` say where they came from."""

    ids: tuple[str, ...]
    patients: tuple[str | None, ...]
    labels: np.ndarray
    id_column: str
    path: Path

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.ids), _N) or self.labels.dtype != np.uint8:
            raise ValueError(f"Invalid labels {self.labels.shape} {self.labels.dtype} - expected uint8 [N, {_N}]")
        if len(self.patients) != len(self.ids):
            raise ValueError(f"Invalid patients: {len(self.patients)} for {len(self.ids)} ids")

    def index(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.ids)}


def _parse_findings(path: Path, texts: Sequence[str], first_line: int = 2) -> np.ndarray:
    combos: dict[str, int] = {}  # a label file has a few hundred distinct combinations: parse each once
    codes = np.fromiter((combos.setdefault(text, len(combos)) for text in texts), dtype=np.int64, count=len(texts))
    table = np.zeros((len(combos), _N), np.uint8)
    unknown: dict[str, int] = {}
    counts = np.bincount(codes, minlength=len(combos))
    for text, code in combos.items():
        for name in (n.strip() for n in text.split("|")):
            i = finding_index(name) if name else None
            if i is not None:
                table[code, i] = 1
            elif name and _key(name) != _key(NO_FINDING):
                unknown[name] = unknown.get(name, 0) + int(counts[code])
    blank = [code for text, code in combos.items() if not text.strip()]
    empty = [int(row) + first_line for row in np.flatnonzero(np.isin(codes, blank))]
    if unknown:
        listed = ", ".join(f"{name!r} ({count} rows)" for name, count in sorted(unknown.items())[:8])
        raise DatasetError(
            f"{path}: unknown finding name(s) in {FINDINGS_COLUMN!r}: {listed} - expected names from "
            f"{', '.join(LABELS)} or {NO_FINDING!r}, joined by '|'"
        )
    if empty:
        raise DatasetError(
            f"{path}: {len(empty)} row(s) have an empty {FINDINGS_COLUMN!r} (line {empty[0]} first) - "
            f"write {NO_FINDING!r} for an image without findings"
        )
    return table[codes]


def _parse_binary(
    path: Path, header: Sequence[str], rows: Sequence[Sequence[str]], columns: Sequence[int]
) -> np.ndarray:
    labels = np.zeros((len(rows), _N), np.uint8)
    values = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
    for c, col in enumerate(columns):
        for r, row in enumerate(rows):
            value = values.get(row[col].strip().lower())
            if value is None:
                raise DatasetError(
                    f"{path}: line {r + 2}, column {header[col]!r}: {row[col]!r} - finding columns must be 0 or 1 "
                    "(map uncertain or missing labels, e.g. CheXpert's -1 and blanks, before calibrating)"
                )
            labels[r, c] = value
    return labels


def read_label_csv(path: Path, *, id_column: str | None = None, patient_column: str | None = None) -> LabelTable:
    """Read a labels CSV: an id column (``id_column`` or one of ID_COLUMNS, e.g. 'Image Index'), then either a
    'Finding Labels' column (names joined by '|', 'No Finding' = none) or one 0/1 column per finding (all 14, names
    as in LABELS ignoring case, spaces and '_'), and optionally a patient column (PATIENT_COLUMNS).

    Raises DatasetError: missing file, missing id/finding columns (named), unknown finding names, values other than
    0/1, empty or duplicate ids.
    """
    path = Path(path)
    header, rows = read_csv(path)
    id_col = find_column(header, [id_column] if id_column else ID_COLUMNS)
    if id_col is None:
        wanted = repr(id_column) if id_column else f"one of {', '.join(repr(c) for c in ID_COLUMNS)}"
        raise DatasetError(f"{path}: no image id column - expected {wanted}; the header is {header}")
    patient_col = find_column(header, [patient_column] if patient_column else PATIENT_COLUMNS)
    if patient_column and patient_col is None:
        raise DatasetError(f"{path}: no patient column {patient_column!r}; the header is {header}")
    findings_col = find_column(header, [FINDINGS_COLUMN])
    if findings_col is not None:
        labels = _parse_findings(path, [row[findings_col] for row in rows])
    else:
        columns = [find_column(header, [label]) for label in LABELS]
        missing = [label for label, col in zip(LABELS, columns, strict=True) if col is None]
        if len(missing) == _N:
            raise DatasetError(
                f"{path}: no labels - expected a {FINDINGS_COLUMN!r} column or one 0/1 column per finding "
                f"({', '.join(LABELS)}); the header is {header}"
            )
        if missing:
            raise DatasetError(f"{path}: finding column(s) missing: {', '.join(missing)}")
        labels = _parse_binary(path, header, rows, [c for c in columns if c is not None])
    ids = tuple(row[id_col].strip() for row in rows)
    if not ids:
        raise DatasetError(f"{path}: no data rows")
    empty = [i + 2 for i, image_id in enumerate(ids) if not image_id]
    if empty:
        raise DatasetError(f"{path}: {len(empty)} row(s) have an empty {header[id_col]!r} (line {empty[0]} first)")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise DatasetError(f"{path}: {len(dup)} duplicate id(s) in {header[id_col]!r}, e.g. {dup[0]!r}")
    patients = (
        tuple(row[patient_col].strip() or None for row in rows) if patient_col is not None else (None,) * len(ids)
    )
    return LabelTable(ids=ids, patients=patients, labels=labels, id_column=header[id_col], path=path)


# -------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelledItem:
    """One validation image: ``image`` float32 [H, W] in [0, 1] (bright = dense), ``labels`` uint8 [14] in LABELS
    order, ``patient_id`` None when the source does not know it."""

    image_id: str
    patient_id: str | None
    image: np.ndarray
    labels: np.ndarray


class LabelledSource:
    """Base of the labelled sources: ``ids``, ``patients``, ``labels`` uint8 [N, 14] known without decoding;
    ``load(i)`` decodes image i (raising a ModelError naming the file when it cannot); iteration yields LabelledItem
    in order. ``description`` says what it is."""

    ids: tuple[str, ...]
    patients: tuple[str | None, ...]
    labels: np.ndarray
    description: str

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[LabelledItem]:
        for i in range(len(self)):
            yield self.item(i)

    def item(self, i: int) -> LabelledItem:
        return LabelledItem(image_id=self.ids[i], patient_id=self.patients[i], image=self.load(i),
                            labels=self.labels[i])


class PhantomSource(LabelledSource):
    """The first ``count`` phantom images (series ``seed``) whose patient falls in ``split`` (train/val/test, by
    ``model.train.split_of``, so splits are patient-disjoint), rendered at ``size`` px. Ids are
    ``phantom:<seed>:<index>``; labels are the phantom's noisy (NLP-like) labels, as in training."""

    def __init__(self, split: str, *, seed: int = 0, count: int = 300, size: int = 256) -> None:
        from model.phantom import sample_labels
        from model.splits import SPLITS, split_of

        if split not in SPLITS:
            raise DatasetError(f"Invalid phantom split {split!r} - expected one of {', '.join(SPLITS)}")
        if count < 1:
            raise DatasetError(f"Invalid count {count} - must be >= 1")
        indices, patients, labels = [], [], []
        index = 0
        while len(indices) < count:
            drawn = sample_labels(seed, index)
            if split_of(drawn.patient_id) == split:
                indices.append(index)
                patients.append(drawn.patient_id)
                labels.append(drawn.labels)
            index += 1
        self.seed, self.size, self.split = seed, size, split
        self.indices = tuple(indices)
        self.ids = tuple(f"phantom:{seed}:{i}" for i in indices)
        self.patients = tuple(patients)
        self.labels = np.stack(labels).astype(np.uint8)
        self.description = f"phantom {split} split (seed {seed}, {count} images, {size} px)"

    def load(self, i: int) -> np.ndarray:
        from model.phantom import generate

        return generate(self.seed, self.indices[i], size=self.size).image


def _missing_message(what: str, missing: Sequence[str], where: Path) -> str:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    return f"{len(missing)} {what} missing from {where}: {shown}"


CHESTXRAY14_SPLITS = {"test": "test_list.txt", "train_val": "train_val_list.txt"}


class ChestXray14Folder(LabelledSource):
    """A ChestX-ray14 folder in the official layout: ``images/`` (or ``images_*/images/``) with the PNGs,
    ``Data_Entry_2017*.csv`` (or ``.csv.gz``; the newest name, e.g. ``_v2020``, wins) and ``test_list.txt`` /
    ``train_val_list.txt`` naming the images of each split. ``limit`` keeps the first images of the list.

    Raises DatasetError: missing folder, label file or split list; listed images absent from the label file or
    from ``images/`` (counted, first ones named).
    """

    def __init__(self, root: Path, *, split: str = "test", limit: int | None = None) -> None:
        root = Path(root)
        if split not in CHESTXRAY14_SPLITS:
            raise DatasetError(f"Invalid split {split!r} - expected one of {', '.join(CHESTXRAY14_SPLITS)}")
        if not root.is_dir():
            raise DatasetError(
                f"{root}: no such folder - expected a ChestX-ray14 folder (images/, Data_Entry_2017*.csv)"
            )
        entries = sorted(p for p in root.glob("Data_Entry_2017*.csv*") if p.name.endswith((".csv", ".csv.gz")))
        if not entries:
            raise DatasetError(f"{root}: no Data_Entry_2017*.csv (or .csv.gz) label file")
        list_file = root / CHESTXRAY14_SPLITS[split]
        if not list_file.is_file():
            raise DatasetError(f"{root}: no {list_file.name} - it names the images of the {split!r} split")
        folders = [root / "images", *sorted(root.glob("images_*/images"))]
        files: dict[str, Path] = {}
        for folder in folders:
            if folder.is_dir():
                with os.scandir(folder) as it:
                    files.update((e.name, Path(e.path)) for e in it if e.is_file())
        if not files:
            raise DatasetError(f"{root}: no images/ folder with image files")
        table = read_label_csv(entries[-1], id_column="Image Index")
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if limit is not None:
            names = names[:limit]
        if not names:
            raise DatasetError(f"{list_file}: lists no images")
        lookup = table.index()
        unlabelled = [n for n in names if n not in lookup]
        if unlabelled:
            raise DatasetError(_missing_message("listed image(s) are", unlabelled, entries[-1]))
        absent = [n for n in names if n not in files]
        if absent:
            raise DatasetError(
                _missing_message(f"image(s) listed in {list_file.name} are", absent, root / "images")
                + " - extract every images_*.tar.gz there, or pass a list of the images you have"
            )
        rows = [lookup[n] for n in names]
        self.ids = tuple(names)
        self.patients = tuple(table.patients[r] for r in rows)
        self.labels = table.labels[rows]
        self.paths = tuple(files[n] for n in names)
        self.description = f"ChestX-ray14 {split} ({len(names)} images, labels {entries[-1].name}) in {root}"

    def load(self, i: int) -> np.ndarray:
        from model.preprocess import decode_file

        return decode_file(self.paths[i])


class DicomFolder(LabelledSource):
    """DICOM files under ``root`` (recursively) labelled by ``labels_csv`` (see :func:`read_label_csv`); the CSV's id
    column matches a file's SOPInstanceUID, its file name, its name without extension, or its path relative to
    ``root``. The patient is the CSV's patient column, else the file's PatientID. Files the CSV does not name and
    non-DICOM files are skipped (counted in ``description``). Images decode with ``model.preprocess.decode_file``
    (MONOCHROME1, VOI LUT).

    Raises DatasetError: missing folder, an unusable CSV, CSV rows whose file is not there (counted, first named).
    """

    def __init__(self, root: Path, labels_csv: Path) -> None:
        import pydicom
        from pydicom.errors import InvalidDicomError

        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder - expected a folder of DICOM files")
        table = read_label_csv(labels_csv)
        by_key: dict[str, tuple[Path, str | None]] = {}
        not_dicom = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SOPInstanceUID", "PatientID"])
            except (InvalidDicomError, OSError, EOFError):
                not_dicom += 1
                continue
            patient = str(ds.get("PatientID") or "") or None
            keys = {path.name, path.stem, path.relative_to(root).as_posix()}
            if ds.get("SOPInstanceUID"):
                keys.add(str(ds.SOPInstanceUID))
            for key in keys:
                by_key.setdefault(key, (path, patient))
        absent = [image_id for image_id in table.ids if image_id not in by_key]
        if absent:
            raise DatasetError(
                _missing_message(f"image(s) named in {Path(labels_csv).name} are", absent, root)
                + " - the id column must hold a SOPInstanceUID, a file name or a path relative to the folder"
            )
        self.ids = table.ids
        self.paths = tuple(by_key[i][0] for i in table.ids)
        self.patients = tuple(p if p is not None else by_key[i][1] for i, p in zip(table.ids, table.patients,
                                                                                  strict=True))
        self.labels = table.labels
        unused = len({p for p, _ in by_key.values()}) - len(set(self.paths))
        self.description = (
            f"DICOM folder {root} with labels {Path(labels_csv).name} ({len(self.ids)} images"
            + (f"; {unused} unlabelled DICOM file(s) ignored" if unused else "")
            + (f"; {not_dicom} non-DICOM file(s) skipped" if not_dicom else "")
            + ")"
        )

    def load(self, i: int) -> np.ndarray:
        from model.preprocess import decode_file

        return decode_file(self.paths[i])


# --------------------------------------------------------------------------------------------------------- splits


def patient_disjoint_halves(
    patient_ids: Iterable[str | None], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two complementary boolean masks [N] splitting the images into halves that share no patient.

    Patients (not images) are shuffled with ``seed``; the first of them, up to N/2 images, form half a, the rest
    half b. An image whose patient is None is its own group: with no patient ids at all the
    split is by image, and images of one patient may then sit in both halves (``split_kind`` says which happened).
    Raises ValueError for fewer than 2 images or a single patient.
    """
    patients = list(patient_ids)
    n = len(patients)
    if n < 2:
        raise ValueError(f"Invalid data: {n} image(s) - need at least 2 to split into halves")
    groups = np.array([p if p is not None else f"\x00image:{i}" for i, p in enumerate(patients)], dtype=object)
    names, codes = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"Invalid data: all {n} images belong to one patient - cannot split patient-disjointly")
    sizes = np.bincount(codes)
    order = np.random.default_rng(seed).permutation(len(names))
    in_a = np.zeros(len(names), bool)
    in_a[order[np.cumsum(sizes[order]) <= n / 2]] = True  # patients in random order until half the images
    if not in_a.any():  # the first patient alone holds more than half
        in_a[order[0]] = True
    mask_a = in_a[codes]
    return mask_a, ~mask_a


def split_kind(patient_ids: Sequence[str | None]) -> str:
    """'patient' when every image has a patient id, 'image' when none has, 'mixed' otherwise."""
    known = sum(p is not None for p in patient_ids)
    return "patient" if known == len(patient_ids) else "image" if known == 0 else "mixed"

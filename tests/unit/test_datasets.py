"""Labelled validation sources: phantom split, a ChestX-ray14 folder (real NIH images), a DICOM folder + labels CSV."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import (
    ChestXray14Folder,
    DatasetError,
    DicomFolder,
    PhantomSource,
    patient_disjoint_halves,
    read_label_csv,
)
from model.errors import ModelError
from model.phantom import generate, sample_labels, to_dicom
from model.train import split_of
from model.types import LABELS

DATA = Path(__file__).parents[2].parent / "shared" / "data"
NIH = DATA / "real-cxr" / "nih"


def _nih_rows() -> list[dict[str, str]]:
    with open(NIH / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def chestxray14(tmp_path: Path) -> Path:
    """The 29 real NIH images in the official layout: images/, Data_Entry_2017.csv, test/train_val lists."""
    root = tmp_path / "cxr14"
    (root / "images").mkdir(parents=True)
    rows = _nih_rows()
    for row in rows:
        shutil.copy(NIH / row["Image Index"], root / "images" / row["Image Index"])
    shutil.copy(NIH / "labels.csv", root / "Data_Entry_2017.csv")
    names = [row["Image Index"] for row in rows]
    (root / "test_list.txt").write_text("\n".join(names[:10]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names[10:]) + "\n")
    return root


def test_chestxray14_folder_reads_the_split_labels_and_images(chestxray14: Path) -> None:
    rows = {row["Image Index"]: row for row in _nih_rows()}
    test = ChestXray14Folder(chestxray14, split="test")
    train_val = ChestXray14Folder(chestxray14, split="train_val")
    assert len(test) == 10 and len(train_val) == 19 and not set(test.ids) & set(train_val.ids)
    for i, image_id in enumerate(test.ids):
        names = set(rows[image_id]["Finding Labels"].split("|")) - {"No Finding"}
        assert {LABELS[c] for c in np.flatnonzero(test.labels[i])} == names
        assert test.patients[i] == rows[image_id]["Patient ID"]
    assert any(rows[i]["Finding Labels"] == "No Finding" for i in test.ids + train_val.ids)
    item = next(iter(test))
    assert item.image.dtype == np.float32 and item.image.shape == (1024, 1024)
    expected = np.asarray(Image.open(NIH / item.image_id).convert("L"), np.float32) / 255
    np.testing.assert_allclose(item.image, expected, atol=1e-6)


def test_chestxray14_folder_names_missing_images_and_files(chestxray14: Path) -> None:
    (chestxray14 / "images" / ChestXray14Folder(chestxray14).ids[3]).unlink()
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed in test_list.txt are missing .*\.png"):
        ChestXray14Folder(chestxray14, split="test")
    (chestxray14 / "train_val_list.txt").unlink()
    with pytest.raises(DatasetError, match="no train_val_list.txt"):
        ChestXray14Folder(chestxray14, split="train_val")
    (chestxray14 / "Data_Entry_2017.csv").unlink()
    with pytest.raises(DatasetError, match="no Data_Entry_2017"):
        ChestXray14Folder(chestxray14)
    with pytest.raises(DatasetError, match="no such folder"):
        ChestXray14Folder(chestxray14 / "nope")


def test_phantom_source_matches_the_generator_and_its_split() -> None:
    val = PhantomSource("val", seed=0, count=6, size=64)
    test = PhantomSource("test", seed=0, count=6, size=64)
    assert all(split_of(p) == "val" for p in val.patients) and not set(val.patients) & set(test.patients)
    index = val.indices[2]
    np.testing.assert_array_equal(val.labels[2], sample_labels(0, index).labels)
    np.testing.assert_array_equal(val.item(2).image, generate(0, index, size=64).image)
    with pytest.raises(DatasetError, match="holdout"):
        PhantomSource("holdout")


@pytest.fixture
def dicom_folder(tmp_path: Path) -> tuple[Path, list]:
    root = tmp_path / "dicom"
    (root / "sub").mkdir(parents=True)
    samples = [generate(1, i, size=64) for i in range(4)]
    for k, sample in enumerate(samples):
        to_dicom(sample).save_as(root / ("sub" if k % 2 else "") / f"img{k}.dcm", enforce_file_format=True)
    (root / "notes.txt").write_text("not DICOM")
    return root, samples


def test_dicom_folder_by_sop_instance_uid_with_per_finding_columns(dicom_folder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, samples = dicom_folder
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", *LABELS])
        for sample in samples[:3]:
            writer.writerow([to_dicom(sample).SOPInstanceUID, *sample.labels.tolist()])
    source = DicomFolder(root, csv_path)
    assert len(source) == 3 and "1 unlabelled DICOM file(s) ignored" in source.description
    assert "1 non-DICOM file(s) skipped" in source.description
    assert source.patients == tuple(s.patient_id for s in samples[:3]), "PatientID from the files"
    for i, sample in enumerate(samples[:3]):
        np.testing.assert_array_equal(source.labels[i], sample.labels)
        np.testing.assert_allclose(source.item(i).image, sample.image, atol=1e-3)


def test_dicom_folder_by_file_name_with_finding_labels(dicom_folder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, samples = dicom_folder
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,Finding Labels,patient\nimg0.dcm,Effusion|Pleural Thickening,X1\nimg1,No Finding,X2\n")
    source = DicomFolder(root, csv_path)
    assert source.patients == ("X1", "X2"), "the CSV's patient column wins"
    assert {LABELS[c] for c in np.flatnonzero(source.labels[0])} == {"Effusion", "Pleural_Thickening"}
    assert source.labels[1].sum() == 0
    csv_path.write_text("file,Finding Labels\nimg0.dcm,Mass\ngone.dcm,Mass\nlost.dcm,No Finding\n")
    with pytest.raises(DatasetError, match=r"2 image\(s\) named in labels.csv are missing .*gone.dcm, lost.dcm"):
        DicomFolder(root, csv_path)
    with pytest.raises(DatasetError, match="no such file"):
        DicomFolder(root, tmp_path / "nope.csv")


def test_label_csv_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("Image Index,Atelectasis,Cardiomegaly\na.png,0,1\n")
    with pytest.raises(DatasetError, match="finding column.*missing: Effusion"):
        read_label_csv(path)
    path.write_text("Image Index,Finding Labels\na.png,\n")
    with pytest.raises(DatasetError, match="empty 'Finding Labels'"):
        read_label_csv(path)
    path.write_text("Image Index,Finding Labels\na.png,Mass\na.png,Nodule\n")
    with pytest.raises(DatasetError, match="duplicate"):
        read_label_csv(path)
    path.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_label_csv(path)


def test_an_undecodable_image_is_named(chestxray14: Path) -> None:
    source = ChestXray14Folder(chestxray14)
    (chestxray14 / "images" / source.ids[0]).write_bytes(b"not an image")
    with pytest.raises(ModelError, match=source.ids[0]):
        source.item(0)


def test_halves_with_one_dominant_patient_and_too_little_data() -> None:
    a, b = patient_disjoint_halves(["big"] * 8 + ["s1", "s2"], seed=0)
    assert a.any() and b.any() and (a[:8].all() or b[:8].all())
    with pytest.raises(ValueError, match="one patient"):
        patient_disjoint_halves(["p", "p", "p"])
    with pytest.raises(ValueError, match="at least 2"):
        patient_disjoint_halves(["p"])

"""model.phantom: determinism, labels against the real NIH file, lesion signatures and masks, DICOM, the CLI."""

from __future__ import annotations

import csv
import gzip
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from scipy import ndimage
from typer.testing import CliRunner

from daemon.cli.phantom import phantom as phantom_command
from model import phantom
from model.phantom import PhantomConfig, generate, sample_labels, to_dicom
from model.preprocess import decode_image
from model.types import LABELS

NIH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nih"
SIZE = 256
IDX = {name: i for i, name in enumerate(LABELS)}


def _only(name: str) -> dict[str, bool]:
    return {label: label == name for label in LABELS}


def _nih_prevalence() -> tuple[np.ndarray, float]:
    with gzip.open(NIH / "Data_Entry_2017_v2020.csv.gz", "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    counts = np.zeros(len(LABELS))
    for row in rows:
        for name in row["Finding Labels"].split("|"):
            if name != "No Finding":
                counts[IDX[name]] += 1
    ap = sum(row["View Position"] == "AP" for row in rows) / len(rows)
    return counts / len(rows), ap


def test_same_seed_and_index_give_identical_samples() -> None:
    a, b = generate(3, 17, size=SIZE), generate(3, 17, size=SIZE)
    for field in ("image", "stored", "labels", "true_labels", "masks", "thorax", "conspicuity"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert (a.patient_id, a.view, a.age, a.sex, a.photometric, a.bits_stored, a.study_date) == (
        b.patient_id, b.view, b.age, b.sex, b.photometric, b.bits_stored, b.study_date)
    assert a.window_center == b.window_center and a.pixel_spacing_mm == b.pixel_spacing_mm


def test_texture_bank_is_rebuilt_identically() -> None:
    before = generate(4, 2, size=96)
    phantom._bank.cache_clear()
    assert np.array_equal(generate(4, 2, size=96).image, before.image)


def test_different_index_or_seed_gives_a_different_image() -> None:
    a = generate(0, 1, size=SIZE)
    assert not np.array_equal(a.image, generate(0, 2, size=SIZE).image)
    assert not np.array_equal(a.image, generate(1, 1, size=SIZE).image)


def test_sample_fields_types_and_ranges() -> None:
    s = generate(0, 5, size=SIZE)
    assert s.image.shape == (SIZE, SIZE) and s.image.dtype == np.float32
    assert 0.0 <= s.image.min() < 0.05 and 0.95 < s.image.max() <= 1.0
    assert s.stored.dtype == np.uint16 and int(s.stored.max()) < 2**s.bits_stored
    assert s.masks.shape == (len(LABELS), SIZE, SIZE) and s.masks.dtype == np.bool_
    assert s.labels.dtype == np.uint8 and s.true_labels.dtype == np.uint8
    assert s.view in ("PA", "AP") and s.sex in ("M", "F") and 0 <= s.age <= 100
    assert s.photometric in ("MONOCHROME1", "MONOCHROME2") and s.bits_stored in (12, 14, 16)
    assert 0.5 < s.pixel_spacing_mm * SIZE / 350.0 < 1.5


def test_acquisition_varies_across_images() -> None:
    samples = [generate(2, i, size=128) for i in range(40)]
    assert {s.bits_stored for s in samples} == {12, 14, 16}
    assert {s.photometric for s in samples} == {"MONOCHROME1", "MONOCHROME2"}
    assert len({round(s.pixel_spacing_mm, 4) for s in samples}) > 30
    assert len({s.window_width for s in samples}) > 30


def test_patients_have_several_images_and_stable_demographics() -> None:
    draws = [sample_labels(6, i) for i in range(600)]
    patients: dict[str, list] = {}
    for d in draws:
        patients.setdefault(d.patient_id, []).append(d)
    assert 60 < len(patients) < 500
    assert max(len(v) for v in patients.values()) >= 5
    for images in patients.values():
        assert len({d.sex for d in images}) == 1
        assert [d.follow_up for d in images] == list(range(images[0].follow_up, images[0].follow_up + len(images)))
        assert all(a.age <= b.age for a, b in zip(images, images[1:], strict=False))


def test_sample_labels_matches_generate() -> None:
    for i in range(6):
        draw, s = sample_labels(8, i), generate(8, i, size=64)
        assert np.array_equal(draw.labels, s.labels) and np.array_equal(draw.true_labels, s.true_labels)
        assert (draw.patient_id, draw.view, draw.age, draw.sex) == (s.patient_id, s.view, s.age, s.sex)


def test_label_prevalence_and_view_follow_the_real_nih_file() -> None:
    real, real_ap = _nih_prevalence()
    n = 3000
    draws = [sample_labels(12, i) for i in range(n)]
    truth = np.array([d.true_labels for d in draws], dtype=float)
    noisy = np.array([d.labels for d in draws], dtype=float)
    tolerance = 4.5 * np.sqrt(real * (1 - real) / n) + 0.003
    assert np.all(np.abs(truth.mean(axis=0) - real) < tolerance), (truth.mean(axis=0), real)
    assert abs(np.mean([d.view == "AP" for d in draws]) - real_ap) < 0.04
    # co-occurrence is real: Effusion goes with Atelectasis far more than chance (NIH lift ~ 2)
    eff, atel = truth[:, IDX["Effusion"]], truth[:, IDX["Atelectasis"]]
    assert (eff * atel).mean() > 1.4 * eff.mean() * atel.mean()
    # label noise: ~10 % of drawn findings are missing from the labels, a few labels are spurious
    kept = noisy[truth == 1].mean()
    assert 0.86 < kept < 0.94
    assert 0 < ((noisy == 1) & (truth == 0)).sum() < 0.06 * n


def test_label_noise_is_configurable() -> None:
    clean = PhantomConfig(drop_rate=0.0, false_positive_rate=0.0)
    for i in range(200):
        d = sample_labels(1, i, config=clean)
        assert np.array_equal(d.labels, d.true_labels)


@pytest.mark.parametrize("name", LABELS)
def test_each_finding_has_a_mask_inside_the_thorax_and_changes_the_image(name: str) -> None:
    for i in range(2):
        present = generate(9, i, size=128, force=_only(name))
        absent = generate(9, i, size=128, force={name: False} | {k: False for k in LABELS})
        k = IDX[name]
        assert present.true_labels[k] == 1 and absent.true_labels[k] == 0
        assert present.masks[k].any(), f"{name}: empty mask"
        assert not np.delete(present.masks, k, axis=0).any(), f"{name}: masks of absent findings"
        assert not absent.masks.any()
        assert not (present.masks[k] & ~present.thorax).any(), f"{name}: mask outside the thorax"
        assert not np.array_equal(present.image, absent.image), f"{name}: no visible change"


def test_masks_exist_exactly_for_drawn_findings() -> None:
    seen = 0
    for i in range(30):
        s = generate(10, i, size=96)
        drawn = s.masks.reshape(len(LABELS), -1).any(axis=1)
        assert np.array_equal(drawn, s.true_labels.astype(bool)), (i, s.true_labels)
        seen += int(s.true_labels.sum())
    assert seen > 5


def _diameters_cm(sample: phantom.PhantomSample, name: str) -> list[float]:
    labels, n = ndimage.label(sample.masks[IDX[name]])
    areas = ndimage.sum_labels(np.ones(labels.shape), labels, index=np.arange(1, n + 1))
    return [float(2 * np.sqrt(a / np.pi) * sample.pixel_spacing_mm / 10) for a in np.atleast_1d(areas)]


def test_nodules_are_under_3_cm_and_masses_at_least_3_cm() -> None:
    nodules = [d for i in range(12) for d in _diameters_cm(generate(11, i, size=SIZE, force=_only("Nodule")), "Nodule")]
    masses = [d for i in range(12) for d in _diameters_cm(generate(11, i, size=SIZE, force=_only("Mass")), "Mass")]
    assert nodules and masses
    assert max(nodules) < 3.0 and min(nodules) > 0.5
    assert min(masses) >= 3.0
    assert np.median(masses) > 2 * np.median(nodules)


def test_cardiomegaly_raises_the_cardiothoracic_ratio() -> None:
    for i in range(8):
        big = generate(13, i, size=SIZE, force=_only("Cardiomegaly"))
        normal = generate(13, i, size=SIZE, force={k: False for k in LABELS})
        assert big.ctr > 0.5 > normal.ctr - (0.01 if normal.view == "AP" else 0.0)
        assert big.ctr > normal.ctr + 0.02
        heart = big.masks[IDX["Cardiomegaly"]]
        heart_width = np.ptp(np.flatnonzero(heart.any(axis=0)))
        thorax_width = np.ptp(np.flatnonzero(big.thorax.any(axis=0)))
        assert heart_width > 0.45 * thorax_width


def test_pneumothorax_region_is_darker_than_without_it() -> None:
    for i in range(6):
        with_ptx = generate(14, i, size=SIZE, force=_only("Pneumothorax"))
        without = generate(14, i, size=SIZE, force={k: False for k in LABELS})
        region = with_ptx.masks[IDX["Pneumothorax"]]
        assert region.sum() > 20
        assert with_ptx.image[region].mean() < without.image[region].mean() - 0.01


def test_effusion_and_consolidation_make_their_region_denser() -> None:
    for name in ("Effusion", "Consolidation", "Mass"):
        for i in range(3):
            present = generate(15, i, size=SIZE, force=_only(name))
            absent = generate(15, i, size=SIZE, force={k: False for k in LABELS})
            region = present.masks[IDX[name]]
            assert present.image[region].mean() > absent.image[region].mean() + 0.02, name


def test_force_changes_only_that_finding() -> None:
    base = generate(16, 3, size=128, force={"Nodule": False})
    more = generate(16, 3, size=128, force={"Nodule": True})
    assert np.array_equal(np.delete(base.true_labels, IDX["Nodule"]), np.delete(more.true_labels, IDX["Nodule"]))
    assert (base.patient_id, base.view, base.bits_stored, base.photometric) == (
        more.patient_id, more.view, more.bits_stored, more.photometric)
    outside = ~more.masks[IDX["Nodule"]]
    assert np.mean(base.image[outside] == more.image[outside]) > 0.5


@pytest.mark.parametrize(("modality", "mono1"), [("DX", False), ("DX", True), ("CR", False), ("CR", True)])
def test_to_dicom_round_trip_decodes_to_the_image(modality: str, mono1: bool) -> None:
    config = PhantomConfig(monochrome1_rate=1.0 if mono1 else 0.0)
    s = generate(17, 4, size=128, config=config)
    assert s.photometric == ("MONOCHROME1" if mono1 else "MONOCHROME2")
    buffer = io.BytesIO()
    to_dicom(s, modality=modality).save_as(buffer, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    np.testing.assert_allclose(decode_image(ds), s.image, atol=1e-5)
    assert ds.Modality == modality and ds.PhotometricInterpretation == s.photometric
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert str(ds.PatientName) == f"PHANTOM^{s.patient_id}" and ds.PatientID == s.patient_id
    assert ds.PatientSex == s.sex and ds.PatientAge == f"{s.age:03d}Y"
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == s.view
    assert ds.Manufacturer == "chexd phantom" and "SYNTHETIC PHANTOM - NOT A PATIENT" in ds.ImageComments
    assert ds.BitsStored == s.bits_stored and ds.Rows == ds.Columns == 128
    assert float(ds.PixelSpacing[0]) == pytest.approx(s.pixel_spacing_mm, abs=1e-4)
    if modality == "DX":
        assert ds.PresentationLUTShape == ("INVERSE" if mono1 else "IDENTITY")


def test_to_dicom_uids_are_deterministic_and_overridable() -> None:
    s = generate(0, 1, size=64)
    a, b = to_dicom(s), to_dicom(s)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    assert to_dicom(generate(0, 2, size=64)).SOPInstanceUID != a.SOPInstanceUID
    c = to_dicom(s, study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    assert (c.StudyInstanceUID, c.SeriesInstanceUID, c.SOPInstanceUID) == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    with pytest.raises(ValueError, match="modality"):
        to_dicom(s, modality="CT")


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, modality: str) -> None:
    path = tmp_path / "phantom.dcm"
    to_dicom(generate(0, 3, size=64), modality=modality).save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "Error" not in report, report


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": 63}, "size"), ({"size": 5000}, "size"), ({"force": {"Nodules": True}}, "Nodules")],
)
def test_generate_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(0, 0, **kwargs)


def test_seed_index_and_config_are_validated() -> None:
    with pytest.raises(ValueError, match="seed"):
        sample_labels(-1, 0)
    with pytest.raises(ValueError, match="index"):
        sample_labels(0, -3)
    with pytest.raises(ValueError, match="drop_rate"):
        PhantomConfig(drop_rate=1.5)
    with pytest.raises(ValueError, match="lesion_contrast"):
        PhantomConfig(lesion_contrast=0)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("phantom")(phantom_command)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer from collapsing the app into "phantom"
        pass

    return app


def test_cli_writes_dicom_files_and_labels_csv(tmp_path: Path) -> None:
    out = tmp_path / "phantoms"
    result = CliRunner().invoke(_cli(), ["phantom", str(out), "--count", "4", "--size", "96", "--seed", "2",
                                         "--modality", "CR", "--start", "10"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 4
    with (out / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == [f.name for f in files]
    assert list(rows[0]) == ["file", "index", "sop_instance_uid", "patient_id", *LABELS]
    for row in rows:
        ds = pydicom.dcmread(out / row["file"])
        assert ds.SOPInstanceUID == row["sop_instance_uid"] and ds.PatientID == row["patient_id"]
        assert ds.Modality == "CR" and ds.Rows == 96
        expected = generate(2, int(row["index"]), size=96)
        assert [int(row[label]) for label in LABELS] == expected.labels.tolist()
        np.testing.assert_allclose(decode_image(ds), expected.image, atol=1e-5)
    assert [int(r["index"]) for r in rows] == [10, 11, 12, 13]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--count", "0"], "--count"), (["--size", "32"], "--size"), (["--modality", "CT"], "--modality"),
     (["--seed", "-1"], "--seed"), (["--start", "-2"], "--start")],
)
def test_cli_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(_cli(), ["phantom", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_as_output_folder(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(_cli(), ["phantom", str(target), "--count", "1", "--size", "64"])
    assert result.exit_code == 2 and "not a folder" in result.output

"""The Storage SCP against real dcmtk peers, on SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from model.preprocess import decode_image
from tests.conftest import REAL_CXR, DaemonProcess, running_daemon
from tests.dicomgen import make_dataset, make_folder, write_dataset
from tests.integration.peers import (
    counts,
    dataset_bytes,
    job_states,
    propose_flag,
    spool_files,
    temp_files,
    wait_until_processed,
)

SIIM = REAL_CXR / "siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm"
MONO1 = REAL_CXR / "Fake_MONOHR1.dcm"


def test_echoscu_gets_success(daemon) -> None:
    assert daemon.echo()


def test_storescu_folder_scan_stores_every_file_and_processes_it(daemon, tmp_path: Path) -> None:
    make_folder(tmp_path / "in" / "a", 3, seed=1)
    make_folder(tmp_path / "in" / "b" / "c", 2, seed=10, bits=8)
    result = daemon.storescu("+sd", "+r", str(tmp_path / "in"))
    assert result.returncode == 0, result.stderr
    engine = daemon.engine()
    states = wait_until_processed(engine, 5)
    assert sorted(states.values()) == ["DONE"] * 5
    assert counts(engine) == {"instances": 5, "jobs": 5}
    assert len(spool_files(daemon.data_dir)) == 5
    studies = daemon.cli("studies", "--json")
    assert '"instances": 3' in studies.stdout and '"instances": 2' in studies.stdout


def test_stored_dataset_bytes_equal_the_bytes_sent(daemon, tmp_path: Path) -> None:
    sent = [
        write_dataset(make_dataset(seed=3), tmp_path / "explicit.dcm"),
        write_dataset(make_dataset(seed=4), tmp_path / "implicit.dcm", ImplicitVRLittleEndian),
        SIIM,
    ]
    for path in sent:
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        result = daemon.storescu(*propose_flag(ts), str(path))
        assert result.returncode == 0, result.stderr
    stored = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in spool_files(daemon.data_dir)}
    for path in sent:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[uid]) == dataset_bytes(path), path.name


@pytest.fixture(scope="module")
def syntax_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon (SQLite: decoding does not depend on the database) for every transfer syntax; no reports."""
    with running_daemon(
        tmp_path_factory.mktemp("syntaxes") / "data", report_quiet_seconds="3600", report_workers="0"
    ) as daemon:
        yield daemon


@pytest.mark.parametrize(
    "transfer_syntax, bits",
    [
        (ExplicitVRLittleEndian, 16),
        (ImplicitVRLittleEndian, 16),
        (DeflatedExplicitVRLittleEndian, 16),
        (RLELossless, 16),
        (JPEGLSLossless, 16),
        (JPEG2000Lossless, 16),
        (JPEGBaseline8Bit, 8),
        (JPEGExtended12Bit, 12),
        (JPEGLosslessSV1, 16),
    ],
    ids=lambda v: getattr(v, "name", str(v)).replace(" ", "_"),
)
def test_each_transfer_syntax_is_received_and_decoded(syntax_daemon, tmp_path: Path, transfer_syntax, bits) -> None:
    daemon = syntax_daemon
    path = write_dataset(make_dataset(bits=bits, seed=5), tmp_path / "in.dcm", transfer_syntax)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    result = daemon.storescu(*propose_flag(transfer_syntax), str(path))
    assert result.returncode == 0, result.stderr
    engine = daemon.engine()
    deadline = time.monotonic() + 60
    while job_states(engine).get(uid) in (None, "QUEUED", "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_states(engine).get(uid) == "DONE", daemon.cli("status", "--json").stdout
    (stored,) = [f for f in spool_files(daemon.data_dir) if f.name == f"{uid}.dcm"]
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == transfer_syntax
    shown = daemon.cli("show", uid, "--json").stdout
    assert '"rows": 64' in shown


def test_real_cxr_files_are_received_and_monochrome1_decodes_inverted(daemon, tmp_path: Path) -> None:
    twin = pydicom.dcmread(MONO1)
    twin.SOPInstanceUID = generate_uid()  # the file shares its UID with the MONOCHROME2 original
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    twin_path = tmp_path / "mono1.dcm"
    twin.save_as(twin_path, enforce_file_format=True)

    result = daemon.storescu("-xy", str(SIIM), str(twin_path))
    assert result.returncode == 0, result.stderr
    states = wait_until_processed(daemon.engine(), 2)
    assert sorted(states.values()) == ["DONE", "DONE"]
    decoded = {}
    for path in spool_files(daemon.data_dir):
        ds = pydicom.dcmread(path)
        decoded[ds.PhotometricInterpretation] = decode_image(ds)
    assert decoded["MONOCHROME2"].shape == (1024, 1024)
    np.testing.assert_allclose(decoded["MONOCHROME1"], 1.0 - decoded["MONOCHROME2"], atol=1e-6)


def test_duplicate_instance_is_acknowledged_and_recorded_once(daemon, tmp_path: Path) -> None:
    path = write_dataset(make_dataset(seed=6), tmp_path / "a.dcm")
    for _ in range(3):
        assert daemon.storescu(str(path)).returncode == 0
    assert counts(daemon.engine()) == {"instances": 1, "jobs": 1}
    assert len(spool_files(daemon.data_dir)) == 1


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"sop_class": CTImageStorage}, "Modality=CT"),
        ({"sop_class": MRImageStorage}, "Modality=MR"),
        ({"body_part": "HAND"}, "BodyPartExamined=HAND"),
        ({"view_position": "LL"}, "ViewPosition=LL"),
    ],
    ids=["CT", "MR", "hand", "lateral"],
)
def test_non_frontal_chest_images_are_stored_but_skipped_with_reason(make_daemon, tmp_path, kwargs, reason) -> None:
    daemon = make_daemon()
    path = write_dataset(make_dataset(seed=7, **kwargs), tmp_path / "x.dcm")
    result = daemon.storescu(str(path))
    assert result.returncode == 0, result.stderr
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    assert job_states(daemon.engine()) == {uid: "SKIPPED"}
    assert len(spool_files(daemon.data_dir)) == 1
    shown = daemon.cli("show", uid, "--json").stdout
    assert reason in shown
    assert '"image_stats": null' in shown  # never decoded, never reached the model


def test_undecodable_pixel_data_fails_the_job_with_a_reason(daemon, tmp_path: Path) -> None:
    path = write_dataset(make_dataset(bits=8, seed=8), tmp_path / "j.dcm", JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    frame = bytearray(ds.PixelData)
    frame[200:600] = b"\x00" * 400  # wreck the entropy-coded segment, keep the encapsulation valid
    ds.PixelData = bytes(frame)
    ds.save_as(path, enforce_file_format=True)
    assert daemon.storescu("-xy", str(path)).returncode == 0
    states = wait_until_processed(daemon.engine(), 1)
    status = daemon.cli("status", "--json").stdout
    assert list(states.values()) == ["FAILED"], status
    assert "cannot be decoded" in status


def test_stop_and_start_keeps_everything(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon()
    make_folder(tmp_path / "in", 4, seed=20)
    assert daemon.storescu("+sd", str(tmp_path / "in")).returncode == 0
    daemon.stop()
    daemon.start()
    assert counts(daemon.engine()) == {"instances": 4, "jobs": 4}
    assert temp_files(daemon.data_dir) == []
    shutil.rmtree(tmp_path / "in")

"""Bad input at the network edge: the right DICOM status, bytes kept in quarantine, nothing outside the spool,
and the node still answers afterwards. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation as DX  # type: ignore[attr-defined]

from tests.dicomgen import bad_files, make_dataset, write_dataset
from tests.integration.peers import counts, dataset_bytes, send_raw, spool_files, temp_files, write_raw

SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000


def _tree(root: Path, exclude: Path) -> set[str]:
    """Every path under ``root`` except the daemon's own data directory."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_relative_to(exclude)}


def _quarantine_reasons(data_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted((data_dir / "quarantine").glob("*.reason.txt"))]


def test_bad_inputs_get_their_status_and_nothing_leaves_the_spool(daemon, tmp_path: Path) -> None:
    files = bad_files(tmp_path / "bad")
    good = write_dataset(make_dataset(seed=1), tmp_path / "good.dcm")
    good_bytes = dataset_bytes(good)
    cases: dict[str, tuple[Path, int]] = {
        "truncated": (files["truncated"], CANNOT_UNDERSTAND),
        "cut": (files["cut"], CANNOT_UNDERSTAND),
        "zero_rows": (files["zero_rows"], CANNOT_UNDERSTAND),
        "garbage": (write_raw(tmp_path / "garbage.dcm", DX, generate_uid(), files["garbage"].read_bytes()),
                    CANNOT_UNDERSTAND),
        "uid_mismatch": (write_raw(tmp_path / "mismatch.dcm", DX, generate_uid(), good_bytes), MISMATCH),
        "traversal_dotdot": (write_raw(tmp_path / "dotdot.dcm", DX, "..", good_bytes), CANNOT_UNDERSTAND),
        "traversal_slash": (write_raw(tmp_path / "slash.dcm", DX, "1.2/../x", good_bytes), CANNOT_UNDERSTAND),
    }
    # a dataset whose own UIDs would escape the spool if used as a path
    evil = make_dataset(seed=2, study_uid="1.2/../../../etc", sop_uid="1.2.3")
    evil_path = tmp_path / "evil.dcm"
    evil.save_as(evil_path, enforce_file_format=True)
    cases["traversal_in_dataset"] = (write_raw(tmp_path / "evil_raw.dcm", DX, "1.2.3", dataset_bytes(evil_path)),
                                     CANNOT_UNDERSTAND)
    before = _tree(tmp_path, daemon.data_dir)

    statuses = {name: send_raw(daemon.port, path) for name, (path, _) in cases.items()}
    assert statuses == {name: expected for name, (_, expected) in cases.items()}

    assert counts(daemon.engine()) == {"instances": 0, "jobs": 0}
    assert spool_files(daemon.data_dir) == [] and temp_files(daemon.data_dir) == []
    reasons = _quarantine_reasons(daemon.data_dir)
    assert len(reasons) == len(cases), "every refused dataset is kept in quarantine with its reason"
    assert any("pixel data truncated" in r for r in reasons)
    assert any("Rows is 0" in r for r in reasons)
    assert any("0xA900" in r for r in reasons)
    assert sorted(p.name for p in daemon.data_dir.iterdir()) == sorted(
        p.name
        for p in daemon.data_dir.iterdir()
        # models/: the registry's copy of the baseline model the daemon registers at start
        if p.name in {"spool", "quarantine", "identity.key", "models"} or p.name.startswith("chexd.db")
    )
    assert _tree(tmp_path, daemon.data_dir) == before, "nothing was written outside the data directory"
    assert not Path("/etc/chexd").exists() and not (daemon.data_dir / "etc").exists()

    assert daemon.echo(), "C-ECHO still answers after bad input"
    assert send_raw(daemon.port, good) == SUCCESS


def test_storescu_sends_of_bad_files_are_refused(daemon, tmp_path: Path) -> None:
    files = bad_files(tmp_path / "bad")
    for name in ("truncated", "zero_rows"):
        result = daemon.storescu(str(files[name]))
        assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr
    assert counts(daemon.engine())["instances"] == 0
    assert daemon.echo()


def test_disk_reserve_above_free_space_answers_out_of_resources(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(disk_reserve_mb=str(10**9))  # a petabyte: always above the free space
    path = write_dataset(make_dataset(seed=3), tmp_path / "a.dcm")
    assert send_raw(daemon.port, path) == OUT_OF_RESOURCES
    assert counts(daemon.engine()) == {"instances": 0, "jobs": 0}
    assert spool_files(daemon.data_dir) == [] and temp_files(daemon.data_dir) == []
    status = daemon.cli("status", "--json").stdout
    assert '"below_reserve": true' in status
    assert daemon.echo()


def test_sop_class_mismatch_is_refused(daemon, tmp_path: Path) -> None:
    ds = make_dataset(seed=4)
    path = write_dataset(ds, tmp_path / "a.dcm")
    other_class = "1.2.840.10008.5.1.4.1.1.1"  # CR, while the dataset says DX
    raw = write_raw(tmp_path / "raw.dcm", other_class, str(ds.SOPInstanceUID), dataset_bytes(path))
    assert send_raw(daemon.port, raw) == MISMATCH
    assert counts(daemon.engine())["instances"] == 0
    assert pydicom.dcmread(path).SOPClassUID == DX

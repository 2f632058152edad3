"""Helpers for integration tests: a raw C-STORE sender and database/spool inspection (jobs, study reports)."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import Engine, func, select

from daemon.store.tables import Instance, Job, JobState, ReportFile, StudyReportRow


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def write_raw(path: Path, sop_class: str, sop_instance: str, dataset: bytes, ts: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file whose meta names ``sop_class``/``sop_instance`` (what the C-STORE request will carry)
    followed by ``dataset`` exactly, whatever it holds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, meta, enforce_standard=False)
        fh.write(dataset)
    return path


def send_raw(port: int, path: Path, *, aec: str = "CHEXD", aet: str = "TESTSCU") -> int:
    """C-STORE the file's dataset bytes unchanged with the request UIDs from its meta; return the status."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    meta, _ = split_dataset(path)
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    assert assoc.is_established, "association failed"
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status)


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            "instances": conn.scalar(select(func.count()).select_from(Instance)),
            "jobs": conn.scalar(select(func.count()).select_from(Job)),
        }


def job_states(engine: Engine) -> dict[str, str]:
    """SOP Instance UID -> job state."""
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Job.state).join(Job, Job.instance_id == Instance.id))
        return {uid: JobState(state).value for uid, state in rows}


def wait_until_processed(engine: Engine, n: int, timeout: float = 60) -> dict[str, str]:
    """Wait until ``n`` jobs have left QUEUED/RUNNING; return their states."""
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(engine)
        done = [s for s in states.values() if s not in ("QUEUED", "RUNNING")]
        if len(done) >= n or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def spool_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "spool").rglob("*.dcm") if ".tmp" not in p.parts)


def temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "spool" / ".tmp").glob("*"))


_PROPOSE = {
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
}


def propose_flag(transfer_syntax: str) -> list[str]:
    """storescu option that proposes ``transfer_syntax`` (storescu proposes only uncompressed ones by default)."""
    flag = _PROPOSE.get(str(transfer_syntax))
    return [flag] if flag else []


def wait_for_reports(engine: Engine, timeout: float = 90, *, n: int = 1, state: str = "DONE") -> list[StudyReportRow]:
    """Every study report row (by revision) once ``n`` are in ``state``, or when ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            rows = conn.execute(select(StudyReportRow).order_by(StudyReportRow.revision)).all()
        if sum(r.state == state for r in rows) >= n or time.monotonic() > deadline:
            return list(rows)
        time.sleep(0.3)


def report_files(engine: Engine, report_id: int) -> dict[str, list[str]]:
    """Kind (pdf, sr, sc, pm, epdf) -> paths relative to the data dir of one report's files."""
    with engine.connect() as conn:
        rows = conn.execute(select(ReportFile.kind, ReportFile.path).where(ReportFile.report_id == report_id)).all()
    out: dict[str, list[str]] = {}
    for kind, path in rows:
        out.setdefault(kind, []).append(path)
    return out

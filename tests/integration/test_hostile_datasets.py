"""Hostile datasets against one running daemon: each gets its C-STORE status and end state (quarantined with the
reason, job FAILED once with the reason, SKIPPED or DONE), and after each one a normal C-ECHO and C-STORE succeed.

One daemon serves the whole module (SQLite; it loads the model once), with small limits so bombs stay cheap to build:
max_image_pixels 4,000,000 and max_decompressed_mb 8. Reports are held back (report_quiet_seconds) - this module is
about the edge and the worker. Each dataset is sent as raw bytes by pynetdicom (what a faulty or hostile peer sends).
"""

from __future__ import annotations

import io
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)
from sqlalchemy import select

from daemon.store.tables import Instance, Job
from tests.conftest import DaemonProcess, running_daemon
from tests.dicomgen import make_dataset
from tests.hostilegen import (
    deflate,
    deflate_bomb,
    encode,
    encode_compressed,
    noise_image,
    patch_j2k_size,
    patch_jpeg_size,
    write_part10,
)
from tests.integration.peers import send_raw

SUCCESS, CANNOT_UNDERSTAND = 0x0000, 0xC000
DX = str(DigitalXRayImageStorageForPresentation)
MAX_PIXELS, MAX_MB = 4_000_000, 8
GOOD_STUDY = generate_uid()

Built = tuple[str, str, str, bytes]  # SOP class, SOP instance UID, transfer syntax, dataset bytes (after file meta)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Built]
    status: int
    end: str  # quarantined | FAILED | DONE | SKIPPED
    reason: str = ""  # a regular expression the quarantine reason or the job's error must match


# ------------------------------------------------------------------------------------------------ dataset builders


def _native(mutate: Callable[[Dataset], object] | None = None, *, ts: str = ExplicitVRLittleEndian, **kw) -> Callable[
    [], Built
]:
    def build() -> Built:
        ds = make_dataset(**{"seed": 7, **kw})
        if mutate is not None:
            mutate(ds)
        raw = encode(ds, implicit=ts == ImplicitVRLittleEndian)
        return str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, deflate(raw) if ts == DeflatedExplicitVRLittleEndian \
            else raw

    return build


def _raw(surgery: Callable[[bytes], bytes], *, frames: bool = False, **kw) -> Callable[[], Built]:
    """Explicit VR LE bytes of a good dataset (with NumberOfFrames 1 if ``frames``), changed by ``surgery``."""

    def build() -> Built:
        ds = make_dataset(**{"seed": 8, **kw})
        if frames:
            ds.NumberOfFrames = 1
        return DX, str(ds.SOPInstanceUID), ExplicitVRLittleEndian, surgery(encode(ds))

    return build


def _set(**attributes) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)

    return mutate


def _bits(allocated: int, stored: int | None = None, high_bit: int | None = None) -> Callable[[Dataset], None]:
    """Re-pack the 12-bit noise image into ``allocated`` bits per pixel (1: packed bits)."""

    def mutate(ds: Dataset) -> None:
        pixels = noise_image(ds.Rows, ds.Columns)
        if allocated == 1:
            data = np.packbits(pixels > 2048, bitorder="little").tobytes()
        elif allocated % 8:
            data = pixels.astype(np.uint16).tobytes()
        else:
            data = pixels.astype(f"<u{allocated // 8}").tobytes()
        bits = stored or min(allocated, 12)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1 if high_bit is None else high_bit
        ds.PixelData = data
        ds["PixelData"].VR = "OB" if allocated <= 8 else "OW"
        ds.WindowCenter, ds.WindowWidth = 2048, 4000

    return mutate


def _colour(photometric: str, samples: int) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples
        if samples > 1:
            ds.PlanarConfiguration = 0
            ds.PixelData = np.repeat(np.frombuffer(ds.PixelData, np.uint16), samples).tobytes()

    return mutate


def _deflated_bomb(**kw) -> Callable[[], Built]:
    def build() -> Built:
        ds, data = deflate_bomb(**kw)
        return DX, str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian, data

    return build


def _j2k(rows: int, columns: int, *, header: tuple[int, int] | None = None, codestream: bytes | None = None) -> \
        Callable[[], Built]:
    """A 64 x 64 JPEG 2000 Lossless image whose SIZ claims rows x columns (and whose DICOM header claims ``header``)."""

    def build() -> Built:
        ds, _ = encode_compressed(make_dataset(seed=9, bits=12, pixel=noise_image(64, 64)))
        if codestream is not None:
            ds.PixelData = encapsulate([codestream])
        if header is not None:
            ds.Rows, ds.Columns = header
        raw = encode(ds)
        if (rows, columns) != (64, 64):
            raw = patch_j2k_size(raw, rows, columns)
        return DX, str(ds.SOPInstanceUID), JPEG2000Lossless, raw

    return build


def _jpeg_ls_claiming(rows: int, columns: int) -> Built:
    ds, raw = encode_compressed(make_dataset(seed=10, bits=12, pixel=noise_image(64, 64)), JPEGLSLossless)
    return DX, str(ds.SOPInstanceUID), JPEGLSLossless, patch_jpeg_size(raw, rows, columns, 0xF7)


def _jpeg_baseline_claiming(rows: int, columns: int) -> Built:
    ds = make_dataset(seed=11, bits=8)
    picture = io.BytesIO()
    Image.fromarray(np.frombuffer(ds.PixelData, np.uint8).reshape(64, 64)).save(picture, "JPEG", quality=90)
    ds.PixelData = encapsulate([picture.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return DX, str(ds.SOPInstanceUID), JPEGBaseline8Bit, patch_jpeg_size(encode(ds), rows, columns, 0xC0)


def _nested(levels: int, *, undefined: bool) -> Callable[[], Built]:
    """ContentSequence nested ``levels`` deep before PixelData (undefined or explicit lengths)."""

    def build() -> Built:
        ds = make_dataset(seed=12)
        raw = encode(ds)
        at = raw.index(b"\xe0\x7f\x10\x00")
        sq_tag, item, item_end, seq_end = b"\x40\x00\x30\xa7SQ\x00\x00", b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", \
            b"\xfe\xff\xdd\xe0"
        if undefined:
            inner = (sq_tag + b"\xff" * 4 + item + b"\xff" * 4) * levels + (item_end + bytes(4) + seq_end + bytes(4)) \
                * levels
        else:
            inner = b""
            for _ in range(levels):
                body = item + struct.pack("<I", len(inner)) + inner
                inner = sq_tag + struct.pack("<I", len(body)) + body
        return DX, str(ds.SOPInstanceUID), ExplicitVRLittleEndian, raw[:at] + inner + raw[at:]

    return build


def _replace_length(keyword_tag: bytes, new_header: bytes) -> Callable[[bytes], bytes]:
    """Swap the explicit-VR element header (tag + VR + length) starting with ``keyword_tag`` for ``new_header``."""

    def surgery(raw: bytes) -> bytes:
        at = raw.index(keyword_tag)
        long_vr = raw[at + 4 : at + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV")
        return raw[:at] + new_header + raw[at + (12 if long_vr else 8) :]

    return surgery


def _text_bytes(tag: bytes, value: bytes) -> Callable[[bytes], bytes]:
    """Replace the value of the short-VR text element ``tag`` with ``value`` (even length, any bytes)."""

    def surgery(raw: bytes) -> bytes:
        at = raw.index(tag)
        (length,) = struct.unpack("<H", raw[at + 6 : at + 8])
        return raw[:at + 6] + struct.pack("<H", len(value)) + value + raw[at + 8 + length :]

    return surgery


def _odd_pixel_length(raw: bytes) -> bytes:
    """65 x 65 8-bit pixels: PixelData with its odd length (4225) and without the pad byte pydicom writes."""
    at = raw.index(b"\xe0\x7f\x10\x00")
    return raw[: at + 8] + struct.pack("<I", 65 * 65) + raw[at + 12 : at + 12 + 65 * 65]


def _truncate(raw: bytes) -> bytes:
    return raw[: raw.index(b"\xe0\x7f\x10\x00") + 100]  # cut inside PixelData's value


def _iso2022(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    ds.StudyDescription = "胸部"


CASES = [
    # refused at the edge: 0xC000, raw bytes quarantined with the reason
    Case("deflate_bomb_header_over_limit", _deflated_bomb(rows=4096, columns=4096), CANNOT_UNDERSTAND, "quarantined",
         r"image too large: .*4096 x 4096 .*max_image_pixels"),
    Case("deflate_bomb_pixel_length", _deflated_bomb(rows=64, columns=64, pixel_bytes=32 << 20), CANNOT_UNDERSTAND,
         "quarantined", r"PixelData claims 33,554,432 bytes .*max_decompressed_mb"),
    Case("deflate_bomb_behind_long_header",
         _deflated_bomb(rows=64, columns=64, pixel_bytes=32 << 20, header_padding=2 << 20), CANNOT_UNDERSTAND,
         "quarantined", r"inflates to more than 8 MiB"),
    Case("deflate_corrupt_stream", lambda: (DX, generate_uid(), DeflatedExplicitVRLittleEndian,
                                            np.random.default_rng(1).bytes(5000)), CANNOT_UNDERSTAND, "quarantined",
         r"deflated dataset is (corrupt|truncated)"),
    Case("deflate_truncated_stream", lambda: (lambda b: (DX, b[1], DeflatedExplicitVRLittleEndian, b[3][:-200]))(
        _native(ts=DeflatedExplicitVRLittleEndian)()), CANNOT_UNDERSTAND, "quarantined",
         r"deflated dataset is truncated"),
    Case("header_over_pixel_limit", _native(_set(Rows=4096, Columns=4096)), CANNOT_UNDERSTAND, "quarantined",
         r"image too large: .*4096 x 4096 x 1 x 1 = 16,777,216 pixels"),
    Case("frames_over_pixel_limit", _native(_set(NumberOfFrames=2000)), CANNOT_UNDERSTAND, "quarantined",
         r"64 x 64 x 2000 x 1 = 8,192,000 pixels"),
    Case("decoded_bytes_over_limit", _native(_set(Rows=1900, Columns=1900, BitsAllocated=32, BitsStored=32,
                                                  HighBit=31)),
         CANNOT_UNDERSTAND, "quarantined", r"BitsAllocated 32 decode to 13.8 MiB .*max_decompressed_mb"),
    Case("j2k_header_claims_60000", _j2k(64, 64, header=(60000, 60000)), CANNOT_UNDERSTAND, "quarantined",
         r"60000 x 60000 x 1 x 1 = 3,600,000,000 pixels"),
    Case("frames_zero", _native(_set(NumberOfFrames=0)), CANNOT_UNDERSTAND, "quarantined", r"NumberOfFrames is 0"),
    Case("frames_negative", _native(_set(NumberOfFrames=-3)), CANNOT_UNDERSTAND, "quarantined",
         r"NumberOfFrames is -3 - must not be negative"),
    Case("frames_garbage", _raw(_text_bytes(b"\x28\x00\x08\x00", b"1x"), frames=True), CANNOT_UNDERSTAND,
         "quarantined",
         r"NumberOfFrames is '1x' - must be an integer"),
    Case("frames_huge", _native(_set(NumberOfFrames=2**31 - 1)), CANNOT_UNDERSTAND, "quarantined", r"too large"),
    Case("rows_zero", _native(_set(Rows=0)), CANNOT_UNDERSTAND, "quarantined", r"Rows is 0"),
    Case("pixel_data_missing", _native(lambda ds: delattr(ds, "PixelData")), CANNOT_UNDERSTAND, "quarantined",
         r"PixelData is missing"),
    Case("pixel_data_short", _native(_set(PixelData=bytes(1000))), CANNOT_UNDERSTAND, "quarantined",
         r"pixel data truncated: expected 8192 bytes, got 1000"),
    Case("truncated_dataset", _raw(_truncate), CANNOT_UNDERSTAND, "quarantined", r"cannot be parsed|truncated"),
    Case("text_length_past_the_end", _raw(_replace_length(b"\x10\x00\x20\x00", b"\x10\x00\x20\x00LO\xf0\xff")),
         CANNOT_UNDERSTAND, "quarantined", r"."),
    Case("long_length_negative", _raw(_replace_length(b"\xe0\x7f\x10\x00", b"\xe0\x7f\x10\x00OW\x00\x00\xf0\xff\xff\xff"
                                                       )), CANNOT_UNDERSTAND, "quarantined",
         r"dataset truncated: element \(7FE0,0010\) declares 4,294,967,280 bytes, 8,192 present"),
    Case("undefined_length_on_text", _raw(_replace_length(b"\x08\x00\x30\x10", b"\x08\x00\x30\x10UT\x00\x00\xff\xff\xff"
                                                          b"\xff")), CANNOT_UNDERSTAND, "quarantined", r"."),
    Case("garbage_vr", _raw(lambda raw: raw.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00\x01\x02", 1)),
         CANNOT_UNDERSTAND, "quarantined", r"."),
    Case("nested_10000_undefined_length", _nested(10_000, undefined=True), CANNOT_UNDERSTAND, "quarantined",
         r"cannot be parsed"),
    Case("nested_10000_defined_length", _nested(10_000, undefined=False), CANNOT_UNDERSTAND, "quarantined",
         r"cannot be parsed"),
    # pydicom notices the VR encoding differs from the context's and reads it as sent
    Case("explicit_bytes_in_implicit_context", lambda: (lambda b: (b[0], b[1], ImplicitVRLittleEndian, b[3]))(
        _native()()), SUCCESS, "DONE"),
    Case("implicit_bytes_in_explicit_context", lambda: (lambda b: (b[0], b[1], ExplicitVRLittleEndian, b[3]))(
        _native(ts=ImplicitVRLittleEndian)()), SUCCESS, "DONE"),
    Case("garbage_bytes", lambda: (DX, generate_uid(), ExplicitVRLittleEndian, np.random.default_rng(2).bytes(4096)),
         CANNOT_UNDERSTAND, "quarantined", r"."),
    Case("empty_dataset", lambda: (DX, generate_uid(), ExplicitVRLittleEndian, b""), CANNOT_UNDERSTAND, "quarantined",
         r"no SOPClassUID"),
    # stored, then the job fails once with the reason (the header alone does not tell)
    Case("j2k_codestream_claims_60000", _j2k(60000, 60000), SUCCESS, "FAILED",
         r"JPEG 2000 .*codestream too large: .*60000 x 60000"),
    Case("j2k_codestream_disagrees", _j2k(32, 64), SUCCESS, "FAILED",
         r"codestream claims 32 x 64 x 1 .*header says .*64 x 64 x 1"),
    Case("j2k_without_siz", _j2k(64, 64, codestream=b"\xff\x4f" + bytes(300)), SUCCESS, "FAILED",
         r"no SIZ marker segment"),
    Case("jpeg_ls_sof55_claims_60000", lambda: _jpeg_ls_claiming(60000, 60000), SUCCESS, "FAILED",
         r"JPEG-LS Lossless .*codestream too large"),
    Case("jpeg_baseline_sof_claims_60000", lambda: _jpeg_baseline_claiming(60000, 60000), SUCCESS, "FAILED",
         r"JPEG Baseline .*codestream too large"),
    Case("bits_allocated_1", _native(_bits(1, 1)), SUCCESS, "FAILED", r"unsupported BitsAllocated 1 "),
    Case("bits_allocated_12", _native(_bits(12)), SUCCESS, "FAILED", r"unsupported BitsAllocated 12 "),
    Case("bits_allocated_64", _native(_bits(64)), SUCCESS, "FAILED", r"unsupported BitsAllocated 64 "),
    Case("bits_stored_over_allocated", _native(_bits(16, 17)), SUCCESS, "FAILED",
         r"BitsStored 17 - must be in 1..BitsAllocated \(16\)"),
    Case("high_bit_wrong", _native(_bits(16, 12, high_bit=15)), SUCCESS, "FAILED", r"HighBit 15 - must be"),
    Case("pixel_representation_2", _native(_set(PixelRepresentation=2)), SUCCESS, "FAILED", r"PixelRepresentation 2"),
    Case("samples_3_monochrome2", _native(_colour("MONOCHROME2", 3)), SUCCESS, "FAILED", r"SamplesPerPixel is 3"),
    Case("photometric_unknown", _native(_colour("MONOCHROME3", 1)), SUCCESS, "FAILED",
         r"unsupported PhotometricInterpretation 'MONOCHROME3'"),
    Case("palette_color", _native(_colour("PALETTE COLOR", 1)), SUCCESS, "FAILED",
         r"unsupported PhotometricInterpretation 'PALETTE COLOR'"),
    Case("ybr_full", _native(_colour("YBR_FULL", 3)), SUCCESS, "FAILED",
         r"unsupported PhotometricInterpretation 'YBR_FULL'"),
    Case("two_frames", _native(lambda ds: (_set(NumberOfFrames=2)(ds), _set(PixelData=ds.PixelData * 2)(ds))),
         SUCCESS, "FAILED", r"NumberOfFrames is 2 - only single-frame"),
    Case("constant_image", _native(_set(PixelData=bytes(8192))), SUCCESS, "FAILED", r"constant image"),
    # stored and processed
    Case("monochrome1", _native(photometric="MONOCHROME1"), SUCCESS, "DONE"),
    Case("bits_allocated_32", _native(_bits(32, 12)), SUCCESS, "DONE"),
    Case("odd_length_pixel_data", _raw(_odd_pixel_length, rows=65, columns=65, bits=8), SUCCESS, "DONE"),
    Case("pixel_data_longer_than_expected", _native(lambda ds: _set(PixelData=ds.PixelData + bytes(4096))(ds)),
         SUCCESS, "DONE"),
    Case("nested_100_undefined_length", _nested(100, undefined=True), SUCCESS, "DONE"),
    Case("charset_unknown", _native(_set(SpecificCharacterSet="ISO_IR 999")), SUCCESS, "DONE"),
    Case("charset_iso2022_japanese", _native(_iso2022), SUCCESS, "DONE"),
    Case("charset_utf8_invalid_bytes",
         _raw(_text_bytes(b"\x10\x00\x10\x00", b"\xff\xfe\xc3\x28\xa0\xa1"),
              patient_id="CHEXD-TEST-0001"), SUCCESS, "DONE"),
    Case("text_vr_garbage", _raw(_text_bytes(b"\x08\x00\x30\x10", b"\x00\x01\x1b[2J\x7f" + b"x" * 120)), SUCCESS,
         "DONE"),
    Case("deflated_normal", _native(ts=DeflatedExplicitVRLittleEndian), SUCCESS, "DONE"),
    Case("not_chest_ct", _native(sop_class=CTImageStorage, body_part="HEAD"), SUCCESS, "SKIPPED"),
    Case("lateral_view", _native(view_position="LL"), SUCCESS, "SKIPPED"),
]


# ------------------------------------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("hostile")
    with running_daemon(
        root / "data",
        f"sqlite:///{root / 'chexd.db'}",
        max_image_pixels=str(MAX_PIXELS),
        max_decompressed_mb=str(MAX_MB),
        report_quiet_seconds="3600",
        report_workers="0",
    ) as process:
        yield process


def _job(daemon: DaemonProcess, uid: str) -> tuple[str, int, str | None] | None:
    with daemon.engine().connect() as conn:
        row = conn.execute(
            select(Job.state, Job.attempts, Job.error).join(Instance, Job.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == uid)
        ).first()
    return None if row is None else (str(getattr(row.state, "value", row.state)), row.attempts, row.error)


def _wait_finished(daemon: DaemonProcess, uid: str, timeout: float = 90) -> tuple[str, int, str | None]:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(daemon, uid)
        if job is not None and job[0] not in ("QUEUED", "RUNNING"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job of {uid} not finished within {timeout}s: {job}")
        time.sleep(0.1)


_GOOD: list[str] = []  # normal images sent after each hostile one
_FAILED: list[str] = []  # SOP Instance UIDs whose job must have FAILED (once)


def _follow_up(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A normal C-ECHO and C-STORE (a new association each) succeed after the hostile one."""
    assert daemon.echo(), "C-ECHO failed after a hostile dataset"
    ds = make_dataset(seed=len(_GOOD), study_uid=GOOD_STUDY, instance_number=len(_GOOD) + 1)
    path = write_part10(tmp_path / "good.dcm", DX, str(ds.SOPInstanceUID), ExplicitVRLittleEndian, encode(ds))
    assert send_raw(daemon.port, path) == SUCCESS, "a normal C-STORE failed after a hostile dataset"
    _GOOD.append(str(ds.SOPInstanceUID))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_dataset_gets_its_status_and_end_state(daemon: DaemonProcess, tmp_path: Path, case: Case) -> None:
    sop_class, uid, ts, data = case.build()
    quarantine = daemon.data_dir / "quarantine"
    before = set(quarantine.glob("*.reason.txt"))
    path = write_part10(tmp_path / "hostile.dcm", sop_class, uid, ts, data)

    assert send_raw(daemon.port, path) == case.status

    new_reasons = [p.read_text() for p in set(quarantine.glob("*.reason.txt")) - before]
    if case.end == "quarantined":
        assert len(new_reasons) == 1, "the refused bytes are kept in quarantine with one reason file"
        assert re.search(case.reason, new_reasons[0]), new_reasons[0]
        assert new_reasons[0].startswith("0xC000 ")
        assert _job(daemon, uid) is None, "a refused dataset has no instance and no job"
    else:
        assert new_reasons == []
        state, attempts, error = _wait_finished(daemon, uid)
        assert state == case.end, error
        if case.end == "FAILED":
            _FAILED.append(uid)
            assert attempts == 1, f"a permanent error is not retried ({attempts} attempts): {error}"
            assert error and re.search(case.reason, error), error
    _follow_up(daemon, tmp_path)


def test_dcmtk_storescu_gets_the_same_answers(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A real peer: storescu sends the deflate bomb (refused: CannotUnderstand) and a JPEG 2000 file whose SIZ lies
    (stored, then FAILED once), in their own transfer syntaxes."""
    ds, bomb = deflate_bomb(4096, 4096)
    bomb_path = write_part10(tmp_path / "bomb.dcm", DX, str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian, bomb)
    result = daemon.storescu("-xd", str(bomb_path))
    assert "Received Store Response (Error: CannotUnderstand)" in result.stderr, result.stderr
    assert _job(daemon, str(ds.SOPInstanceUID)) is None

    _, uid, ts, raw = _j2k(60000, 60000)()
    lie = write_part10(tmp_path / "lie.dcm", DX, uid, ts, raw)
    result = daemon.storescu("-xv", str(lie))
    assert "Received Store Response (Success)" in result.stderr, result.stderr
    state, attempts, error = _wait_finished(daemon, uid)
    assert (state, attempts) == ("FAILED", 1) and error and "codestream too large" in error
    _FAILED.append(uid)
    _follow_up(daemon, tmp_path)


def test_daemon_log_names_each_failure_once_without_tracebacks(daemon: DaemonProcess) -> None:
    """Runs after the corpus (file order): every normal image sent between hostile ones was processed; each FAILED job
    left exactly one line, a WARNING with its UID and reason; no traceback anywhere; the daemon is still serving."""
    for uid in _GOOD:
        assert _wait_finished(daemon, uid)[0] == "DONE"
    log = daemon.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 : log.index("Traceback") + 3000]
    failed = [line for line in log.splitlines() if "job failed" in line]
    assert all(" WARNING " in line and ": " in line.split("sop_instance_uid=")[1] for line in failed), failed
    uids = [line.split("sop_instance_uid=")[1].split(":")[0] for line in failed]
    assert sorted(uids) == sorted(_FAILED), "each FAILED job is logged once with its UID, never retried"
    assert daemon.proc is not None and daemon.proc.poll() is None and daemon.echo()
    assert pydicom.config.settings.reading_validation_mode  # the sender side did not change pydicom's defaults

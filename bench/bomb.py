"""Bomb bench: decompression bombs sent in parallel to a running chexd; its memory, each sender's status, and whether
it keeps serving - beside what the off-the-shelf reader (pydicom ``dcmread`` + ``pixel_array``) does with the same
files.

    python -m bench.bomb [--j2k 10] [--side 11585] [--json]

Inputs (built in memory with tests.hostilegen, nothing downloaded):
- the deflate bomb: Deflated Explicit VR Little Endian, Rows = Columns = ``--side`` (default 11585: 256 MiB of
  16-bit pixels, all zero), ~255 KiB on the wire - the probe of issue 12 took chexd from 763 to 4,607 MiB with it;
- ``--j2k`` JPEG 2000 Lossless datasets whose DICOM header claims 60000 x 60000 over a 64 x 64 codestream;
- ``--j2k`` JPEG 2000 Lossless datasets whose header says 64 x 64 while the codestream's SIZ marker claims
  60000 x 60000 (the header cannot tell; the worker must read the codestream header before decoding).

chexd runs as ``python -m daemon serve`` (from ``--daemon-root``, default this checkout) with its defaults (limits
included, model loaded, one worker thread; own data dir, SQLite). After a warm-up (one normal C-STORE processed to
DONE, one C-ECHO) its resident set (VmRSS of the daemon process in /proc, sampled every 10 ms) is the baseline. Then
every input is sent at once, each over its own association from its own loopback address (127.0.0.2, .3 ... so the
per-address connection cap does not interfere), the stored ones are waited for until their jobs finish, and a
normal C-ECHO and C-STORE are sent.
Reported: each input's C-STORE status and end state, the daemon's peak RSS growth over the baseline (target
< 500 MiB), and for one input of each kind the off-the-shelf reader's peak RSS growth, run in a child process under
an address-space cap of ``--cap-gib`` (default 6) so a bomb that really tries to allocate fails there instead of
taking the machine down; the ratio is chexd's growth over the reader's on the deflate bomb.

Exit status: 0 when every input got a status and the daemon still served afterwards (whether or not the target is
met), 1 when something failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_GROWTH_MIB = 500
_READY_TIMEOUT_S = 120.0
_JOB_TIMEOUT_S = 300.0
_SAMPLE_S = 0.01

_OFF_THE_SHELF = """
import json, resource, sys
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import pydicom
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
base = rss("VmRSS:")
try:
    shape = list(pydicom.dcmread(sys.argv[1]).pixel_array.shape)
    outcome = "decoded " + "x".join(map(str, shape))
except MemoryError:
    outcome = "MemoryError at the %d GiB cap" % (cap >> 30)
except Exception as exc:
    text = " ".join(str(exc).split())
    outcome = (type(exc).__name__ + ": " + text.split("plugins:", 1)[-1].strip())[:150]
print(json.dumps({"base_mib": base, "peak_mib": rss("VmHWM:"), "outcome": outcome}))
"""


class BenchError(RuntimeError):
    """chexd did not start, or a step of the run failed."""


@dataclass(frozen=True)
class Input:
    kind: str
    path: Path
    sop_instance_uid: str
    transfer_syntax: str


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_inputs(folder: Path, side: int, j2k: int) -> tuple[list[Input], Path]:
    """Write the bomb, the J2K inputs and one normal image to ``folder``; return the inputs and the normal file."""
    sys.path.insert(0, str(REPO_ROOT))
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless

    from tests.dicomgen import make_dataset
    from tests.hostilegen import (
        deflate_bomb,
        encode,
        encode_compressed,
        noise_image,
        patch_j2k_size,
        write_part10,
    )

    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    ds, data = deflate_bomb(side, side)
    inputs.append(Input("deflate", write_part10(folder / "bomb.dcm", str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                                DeflatedExplicitVRLittleEndian, data),
                        str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian))
    for i in range(j2k):
        for kind in ("j2k_header", "j2k_codestream"):
            ds, _ = encode_compressed(make_dataset(seed=i, bits=12, pixel=noise_image(64, 64, seed=i)))
            if kind == "j2k_header":
                ds.Rows = ds.Columns = 60000
                raw = encode(ds)
            else:
                raw = patch_j2k_size(encode(ds), 60000, 60000)
            path = write_part10(folder / f"{kind}{i:02d}.dcm", str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                JPEG2000Lossless, raw)
            inputs.append(Input(kind, path, str(ds.SOPInstanceUID), JPEG2000Lossless))
    good = make_dataset(rows=512, columns=512, seed=99)
    normal = write_part10(folder / "normal.dcm", str(good.SOPClassUID), str(good.SOPInstanceUID),
                          ExplicitVRLittleEndian, encode(good))
    return inputs, normal


def off_the_shelf(path: Path, cap_bytes: int) -> dict[str, Any]:
    """pydicom dcmread + pixel_array of ``path`` in a child process under an address-space cap."""
    result = subprocess.run([sys.executable, "-c", _OFF_THE_SHELF, str(path), str(cap_bytes)], capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return {"base_mib": 0.0, "peak_mib": 0.0, "outcome": f"exit {result.returncode}: {result.stderr[-200:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


class RssSampler:
    """Peak VmRSS (MiB) of one process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> float:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.rss())
            except OSError:
                return
            self._stop.wait(_SAMPLE_S)

    def start(self) -> RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def send(port: int, path: Path, source: str = "127.0.0.1") -> int | None:
    """C-STORE the file's dataset bytes unchanged (pynetdicom, chunked) from ``source``; the status, or None."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta, _ = split_dataset(path)
    ae = AE(ae_title="BOMBSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXD", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="BOMBSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXD")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()


def job_states(database: Path, uids: list[str]) -> dict[str, tuple[str, str | None]]:
    from sqlalchemy import create_engine, select

    from daemon.store.tables import Instance, Job

    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Instance.sop_instance_uid, Job.state, Job.error)
                                .join(Job, Job.instance_id == Instance.id)
                                .where(Instance.sop_instance_uid.in_(uids))).all()
    finally:
        engine.dispose()
    return {uid: (str(getattr(state, "value", state)), error) for uid, state, error in rows}


def wait_jobs(database: Path, uids: list[str], timeout: float = _JOB_TIMEOUT_S) -> dict[str, tuple[str, str | None]]:
    deadline = time.monotonic() + timeout
    while True:
        states = job_states(database, uids)
        if len(states) == len(uids) and all(s not in ("QUEUED", "RUNNING") for s, _ in states.values()):
            return states
        if time.monotonic() > deadline:
            raise BenchError(f"jobs not finished within {timeout:.0f} s: {states}")
        time.sleep(0.2)


def start_chexd(work: Path, root: Path = REPO_ROOT, as_gib: int = 0) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``python -m daemon serve`` from ``root``; with ``as_gib`` its address space is capped (RLIMIT_AS) so a daemon
    without limits fails with MemoryError instead of exhausting the machine."""

    def cap() -> None:
        if as_gib:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (as_gib << 30, as_gib << 30))

    data_dir = work / "chexd-data"
    log_path = work / "chexd.log"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
    env.update(CHEXD_DATA_DIR=str(data_dir), CHEXD_PORT=str(port), CHEXD_BIND_ADDRESS="0.0.0.0",
               CHEXD_DISK_RESERVE_MB="0", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "daemon", "serve"], cwd=root, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=cap)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"chexd exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if "storage SCP listening" in log_path.read_text(errors="replace"):
            return process, port, data_dir
        time.sleep(0.2)
    _stop(process)
    raise BenchError(f"chexd did not listen within {_READY_TIMEOUT_S:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _status_text(statuses: list[int | None]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        key = "no status" if status is None else f"0x{status:04X}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="chexd-bomb-"))
    try:
        _log(f"building inputs in {work} ...")
        inputs, normal = build_inputs(work / "inputs", args.side, args.j2k)
        bomb_kib = inputs[0].path.stat().st_size / 1024
        cap = args.cap_gib << 30
        reference = {}
        for kind in ("deflate", "j2k_header", "j2k_codestream"):
            sample = next(i for i in inputs if i.kind == kind)
            _log(f"off-the-shelf: pydicom dcmread + pixel_array of {sample.path.name} (address space cap "
                 f"{args.cap_gib} GiB) ...")
            reference[kind] = off_the_shelf(sample.path, cap)

        _log("starting chexd ...")
        process, port, data_dir = start_chexd(work, args.daemon_root, args.daemon_as_gib)
        try:
            sampler = RssSampler(process.pid)
            if send(port, normal) != 0 or not echo(port):
                raise BenchError("warm-up C-STORE/C-ECHO failed")
            from pydicom import dcmread

            warm_uid = str(dcmread(normal, stop_before_pixels=True).SOPInstanceUID)
            wait_jobs(data_dir / "chexd.db", [warm_uid])
            time.sleep(1.0)
            baseline = sampler.rss()
            sampler.start()

            _log(f"sending {len(inputs)} inputs in parallel ...")
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
                statuses = list(pool.map(lambda pair: send(port, pair[1].path, f"127.0.0.{pair[0] + 2}"),
                                         enumerate(inputs)))
            send_s = time.perf_counter() - started
            stored = [i.sop_instance_uid for i, s in zip(inputs, statuses, strict=True) if s == 0]
            _log(f"statuses in {send_s:.1f} s; waiting for {len(stored)} stored job(s) ...")
            states = wait_jobs(data_dir / "chexd.db", stored) if stored else {}
            peak = sampler.stop()

            good = make_normal_copy(normal, work)
            after_echo, after_store = echo(port), send(port, good)
            alive = process.poll() is None
        finally:
            _stop(process)
        log_text = (work / "chexd.log").read_text(errors="replace")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for kind, label in (
        ("deflate", f"deflate bomb {args.side}x{args.side}x16, {bomb_kib:,.0f} KiB"),
        ("j2k_header", "J2K, header claims 60000x60000"),
        ("j2k_codestream", "J2K, SIZ claims 60000x60000 under a 64x64 header"),
    ):
        mine = [(i, s) for i, s in zip(inputs, statuses, strict=True) if i.kind == kind]
        ends: dict[str, int] = {}
        for item, status in mine:
            end = "quarantined" if status == 0xC000 else states.get(item.sop_instance_uid, ("-", None))[0]
            ends[end] = ends.get(end, 0) + 1
        ref = reference[kind]
        rows.append({
            "input": label,
            "sent": len(mine),
            "chexd_status": _status_text([s for _, s in mine]),
            "chexd_end_state": ", ".join(f"{k} x{n}" for k, n in sorted(ends.items())),
            "off_the_shelf_growth_mib": round(ref["peak_mib"] - ref["base_mib"], 1),
            "off_the_shelf_outcome": ref["outcome"],
        })
    growth = peak - baseline
    bomb_reference = reference["deflate"]["peak_mib"] - reference["deflate"]["base_mib"]
    return {
        "rows": rows,
        "daemon_baseline_mib": round(baseline, 1),
        "daemon_peak_mib": round(peak, 1),
        "daemon_growth_mib": round(growth, 1),
        "target_growth_mib": TARGET_GROWTH_MIB,
        "off_the_shelf_bomb_growth_mib": round(bomb_reference, 1),
        "ratio_growth_chexd_over_off_the_shelf": round(growth / bomb_reference, 4) if bomb_reference > 0 else None,
        "send_seconds": round(send_s, 2),
        "after_echo_ok": after_echo,
        "after_store_status": after_store,
        "daemon_alive": alive,
        "tracebacks_in_log": log_text.count("Traceback"),
        "every_input_answered": all(s is not None for s in statuses),
        "machine": machine(),
    }


def make_normal_copy(normal: Path, work: Path) -> Path:
    """The normal image again under a new SOP Instance UID (a fresh C-STORE, not a duplicate)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(normal)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = work / "normal2.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg_1m": round(os.getloadavg()[0], 2),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="chexd under decompression bombs (all inputs sent at once)")
    for column in ("input", "sent", "chexd status", "chexd end state", "off-the-shelf RSS growth",
                   "off-the-shelf outcome"):
        table.add_column(column)
    for row in result["rows"]:
        table.add_row(row["input"], str(row["sent"]), row["chexd_status"], row["chexd_end_state"],
                      f"{row['off_the_shelf_growth_mib']:,.0f} MiB", row["off_the_shelf_outcome"])
    console = Console(width=160)
    console.print(table)
    met = "met" if result["daemon_growth_mib"] < TARGET_GROWTH_MIB else "NOT met"
    ratio = result["ratio_growth_chexd_over_off_the_shelf"]
    console.print(
        f"chexd RSS: baseline {result['daemon_baseline_mib']:,.0f} MiB, peak {result['daemon_peak_mib']:,.0f} MiB, "
        f"growth {result['daemon_growth_mib']:,.1f} MiB (target < {TARGET_GROWTH_MIB} MiB: {met}); "
        f"off-the-shelf on the deflate bomb: +{result['off_the_shelf_bomb_growth_mib']:,.0f} MiB; "
        f"ratio chexd/off-the-shelf {ratio if ratio is not None else '-'}"
    )
    console.print(
        f"afterwards: C-ECHO {'ok' if result['after_echo_ok'] else 'FAILED'}, C-STORE status "
        f"{result['after_store_status']!r}, daemon alive {result['daemon_alive']}, tracebacks in its log "
        f"{result['tracebacks_in_log']}; all sent in {result['send_seconds']} s; machine {result['machine']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bomb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--j2k", type=int, default=10, help="J2K inputs of each kind (default 10)")
    parser.add_argument("--side", type=int, default=11585, help="the deflate bomb's Rows = Columns (default 11585)")
    parser.add_argument("--cap-gib", type=int, default=6, help="address-space cap of the off-the-shelf child")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (inputs, chexd log)")
    parser.add_argument("--daemon-root", type=Path, default=REPO_ROOT,
                        help="run the daemon of another checkout (e.g. one before the limits, for a before/after)")
    parser.add_argument("--daemon-as-gib", type=int, default=0,
                        help="cap the daemon's address space (GiB; 0: none) - for a daemon without limits")
    args = parser.parse_args(argv)
    if args.j2k < 0 or args.side < 1 or args.cap_gib < 1 or args.j2k > 100:
        parser.error("--j2k must be in 0..100, --side and --cap-gib >= 1")
    try:
        result = run(args)
    except BenchError as exc:
        _log(f"bench failed: {exc}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    ok = result["every_input_answered"] and result["after_echo_ok"] and result["after_store_status"] == 0
    return 0 if ok and result["daemon_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())

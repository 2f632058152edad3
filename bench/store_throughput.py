"""C-STORE throughput: dcmtk ``storescu`` -> chexd (store only) beside dcmtk ``storescp``, in the same run.

    python -m bench.store_throughput [--copies 200] [--sizes 512x512x16,2048x2048x16] [--repeat 3] [--json]
                                     [--baseline DIR]

For each image size (ROWSxCOLUMNSxBITS) one synthetic chest image is generated with ``tests.dicomgen`` and written
``--copies`` times with distinct SOP Instance UIDs (one study, one series). Each repetition then sends the whole folder
over one association with ``storescu +sd`` to a fresh ``storescp -od`` and to a fresh ``chexd serve`` (own data dir,
no worker threads), alternately, and times the storescu command (wall clock). Afterwards it checks that the receiver
holds every file. Reported: the median over repetitions in images/s and MB/s (MB = 10^6 bytes of Part 10 file), and
the ratio chexd/storescp. Targets (issue 12): chexd >= 150 img/s on the smallest image and >= 0.6x storescp on the
largest.

``--baseline DIR`` runs the chexd of another checkout (e.g. ``git worktree add /tmp/base main~3``) as a third
receiver, interleaved with the others, so a before/after comparison sees the same machine load: on a busy machine
two separate runs differ by more than most changes do.

dcmtk (since 3.6.2) leaves Nagle's algorithm on unless the environment sets ``TCP_NODELAY=1``; with it on,
storescu -> storescp stalls ~40 ms (delayed ACK) at the end of every instance while storescu -> chexd does not, so
the ratio would measure a TCP setting, not the receivers. The benchmark therefore runs storescu, storescp and
echoscu with ``TCP_NODELAY=1`` (dcmtk's documented switch); ``--dcmtk-nagle`` keeps dcmtk's default.

Not a like-for-like comparison of durability: chexd fsyncs each file, its folder and the SQLite WAL commit before it
answers; storescp does not fsync (see bench/README.md). Between runs the page cache is flushed (``sync``, untimed)
so one receiver's dirty pages are not written back during the other's timing.

Exit status: 0 when every run delivered every file (whether or not the target is met), 1 when a run failed,
2 for bad arguments or missing dcmtk tools. Progress goes to stderr, the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.6  # chexd/storescp on the largest image
TARGET_SMALL_RATE = 150.0  # chexd images/s on the smallest image
DEFAULT_SIZES = "512x512x16,2048x2048x16"
_SIZE = re.compile(r"^(\d+)x(\d+)x(\d+)$")
_TOOLS = ("storescu", "storescp", "echoscu")
_READY_TIMEOUT_S = 60.0
_SEND_TIMEOUT_S = 900.0
_DCMTK_ENV = {"TCP_NODELAY": "1"}  # replaced by {} with --dcmtk-nagle


class BenchError(RuntimeError):
    """A receiver did not start, storescu failed, or files are missing afterwards."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageSize:
    """Rows x columns (pixels) and BitsStored (8 or 16)."""

    rows: int
    columns: int
    bits: int

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.columns}x{self.bits}"


@dataclass(kw_only=True, slots=True)
class ReceiverResult:
    """Timed runs of one receiver for one image size; ``seconds`` has one wall-clock time per good repetition."""

    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    def rate(self, copies: int) -> float | None:
        median = self.median_s()
        return copies / median if median else None

    def as_dict(self, copies: int, file_bytes: int) -> dict[str, Any]:
        rate = self.rate(copies)
        return {
            "seconds": [round(s, 4) for s in self.seconds],
            "median_s": self.median_s(),
            "images_per_s": rate,
            "mb_per_s": rate * file_bytes / 1e6 if rate else None,
            "errors": self.errors,
        }


# --- arguments ---------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[ImageSize]:
    """``"1024x1024x8,2048x2048x16"`` -> sizes; raises ValueError naming the bad entry."""
    sizes = []
    for entry in (part.strip() for part in text.split(",")):
        match = _SIZE.match(entry)
        if not match:
            raise ValueError(f"Invalid size {entry!r} - expected ROWSxCOLUMNSxBITS, e.g. 2048x2048x16")
        rows, columns, bits = (int(g) for g in match.groups())
        if rows < 1 or columns < 1 or bits not in (8, 16):
            raise ValueError(f"Invalid size {entry!r} - rows and columns must be >= 1 and bits 8 or 16")
        sizes.append(ImageSize(rows=rows, columns=columns, bits=bits))
    if not sizes:
        raise ValueError("Invalid --sizes '' - give at least one ROWSxCOLUMNSxBITS")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.store_throughput",
        description="C-STORE throughput: storescu -> chexd (store only) versus storescu -> storescp, same run.",
    )
    parser.add_argument("--copies", type=int, default=200, help="instances per image size (default 200)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"ROWSxCOLUMNSxBITS list (default {DEFAULT_SIZES})")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per receiver; median reported (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run the chexd of this checkout (a repository root), interleaved, as receiver 'baseline'",
    )
    parser.add_argument(
        "--dcmtk-nagle",
        action="store_true",
        help="run dcmtk with its default (Nagle on, ~40 ms stall per instance) instead of TCP_NODELAY=1",
    )
    return parser


# --- machine and tools -------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    try:
        dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True, check=False).stdout
        dcmtk_version = next((ln.strip("$ ").strip() for ln in dcmtk.splitlines() if "dcmtk" in ln), "unknown")
    except OSError:
        dcmtk_version = "unknown"
    import pydicom
    import pynetdicom

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": dcmtk_version,
    }


def _check_tools() -> None:
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"dcmtk tools not found on PATH: {', '.join(missing)} - install dcmtk (apt install dcmtk)")


def _dcmtk_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    env.update(_DCMTK_ENV)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- test data ---------------------------------------------------------------------------------------------------


def make_copies(size: ImageSize, copies: int, folder: Path, seed: int = 0) -> int:
    """Write ``copies`` instances of one image (one study/series, distinct SOP Instance UIDs) to ``folder``.

    Returns the size of one file in bytes (all copies have the same length up to a few UID characters).
    """
    import pydicom
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(REPO_ROOT))
    from tests.dicomgen import make_dataset, write_dataset

    folder.mkdir(parents=True, exist_ok=True)
    first = write_dataset(
        make_dataset(rows=size.rows, columns=size.columns, bits=size.bits, seed=seed), folder / "IM0001.dcm"
    )
    ds = pydicom.dcmread(first)
    for i in range(1, copies):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"IM{i + 1:04d}.dcm", enforce_file_format=True)
    files = sorted(folder.glob("*.dcm"))
    if len(files) != copies:
        raise BenchError(f"generated {len(files)} files in {folder}, expected {copies}")
    return round(statistics.mean(f.stat().st_size for f in files))


# --- receivers ---------------------------------------------------------------------------------------------------


def _wait_ready(process: subprocess.Popen[bytes], ae_title: str, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{ae_title} exited with {process.returncode} before answering C-ECHO:\n{_tail(log_path)}")
        echo = subprocess.run(
            ["echoscu", "-to", "2", "-aec", ae_title, "127.0.0.1", str(port)],
            capture_output=True,
            env=_dcmtk_env(),
            check=False,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.2)
    raise BenchError(f"{ae_title} did not answer C-ECHO on port {port} within {_READY_TIMEOUT_S:.0f} s")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _send(ae_title: str, port: int, folder: Path) -> float:
    """Time ``storescu +sd folder`` (one association, every file); raise BenchError if it fails."""
    command = ["storescu", "-aec", ae_title, "127.0.0.1", str(port), "+sd", str(folder)]
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=_SEND_TIMEOUT_S, env=_dcmtk_env(), check=False
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise BenchError(f"storescu -> {ae_title} exited with {result.returncode}: {result.stderr.strip()[-2000:]}")
    return elapsed


def run_storescp(folder: Path, copies: int, work: Path) -> float:
    """One timed storescu -> storescp run into a fresh output folder; returns seconds."""
    out_dir = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    log_path = work / f"{out_dir.name}.log"
    port = _free_port()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["storescp", "-od", str(out_dir), "-aet", "STORESCP", str(port)],
            env=_dcmtk_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, "STORESCP", port, log_path)
        seconds = _send("STORESCP", port, folder)
    finally:
        _stop(process)
    received = sum(1 for p in out_dir.iterdir() if p.is_file())
    shutil.rmtree(out_dir)
    os.sync()
    if received != copies:
        raise BenchError(f"storescp holds {received} files, expected {copies}:\n{_tail(log_path)}")
    return seconds


def run_chexd(folder: Path, copies: int, work: Path, root: Path = REPO_ROOT) -> float:
    """One timed storescu -> chexd (fresh data dir, no worker) run of the checkout at ``root``; returns seconds."""
    data_dir = Path(tempfile.mkdtemp(prefix="chexd-", dir=work))
    log_path = work / f"{data_dir.name}.log"
    port = _free_port()
    env = {
        **os.environ,
        "CHEXD_DATA_DIR": str(data_dir),
        "CHEXD_PORT": str(port),
        "CHEXD_BIND_ADDRESS": "127.0.0.1",
        "CHEXD_DISK_RESERVE_MB": "0",
        "CHEXD_WORKER_THREADS": "0",
    }
    env.pop("CHEXD_CONFIG", None)
    env.pop("CHEXD_DATABASE_URL", None)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve"],
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, "CHEXD", port, log_path)
        seconds = _send("CHEXD", port, folder)
    finally:
        _stop(process)
    spool = data_dir / "spool"
    stored = sum(1 for p in spool.rglob("*.dcm") if ".tmp" not in p.relative_to(spool).parts)
    shutil.rmtree(data_dir)
    os.sync()
    if stored != copies:
        raise BenchError(f"chexd spool holds {stored} files, expected {copies}:\n{_tail(log_path)}")
    return seconds


RECEIVERS: dict[str, Any] = {"storescp": run_storescp, "chexd": run_chexd}


def receivers(baseline: Path | None) -> dict[str, Any]:
    """The receivers of one run, in the order they take turns."""
    if baseline is None:
        return dict(RECEIVERS)
    return {**RECEIVERS, "baseline": lambda folder, copies, work: run_chexd(folder, copies, work, baseline)}


# --- the run -----------------------------------------------------------------------------------------------------


def run(
    sizes: list[ImageSize], copies: int, repeat: int, work: Path, baseline: Path | None = None
) -> list[dict[str, Any]]:
    """Generate, send and verify; return one result dict per size (see ``--json``)."""
    rows = []
    turns = receivers(baseline)
    for index, size in enumerate(sizes):
        folder = work / f"images-{size.label}"
        _log(f"generating {copies} x {size.label} ...")
        file_bytes = make_copies(size, copies, folder, seed=index)
        os.sync()
        results = {name: ReceiverResult() for name in turns}
        for rep in range(repeat):
            for name, receiver in turns.items():
                try:
                    seconds = receiver(folder, copies, work)
                except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
                    results[name].errors.append(f"repetition {rep + 1}: {exc}")
                    _log(f"  {size.label} {name:8s} rep {rep + 1}: FAILED {exc}")
                    continue
                results[name].seconds.append(seconds)
                _log(f"  {size.label} {name:8s} rep {rep + 1}: {seconds:7.2f} s  {copies / seconds:8.1f} img/s")
        shutil.rmtree(folder)
        storescp_rate = results["storescp"].rate(copies)
        chexd_rate = results["chexd"].rate(copies)
        row = {
            "size": size.label,
            "rows": size.rows,
            "columns": size.columns,
            "bits": size.bits,
            "file_bytes": file_bytes,
            "copies": copies,
            "storescp": results["storescp"].as_dict(copies, file_bytes),
            "chexd": results["chexd"].as_dict(copies, file_bytes),
            "ratio": chexd_rate / storescp_rate if chexd_rate and storescp_rate else None,
        }
        if "baseline" in results:
            baseline_rate = results["baseline"].rate(copies)
            row["baseline"] = results["baseline"].as_dict(copies, file_bytes)
            row["baseline_ratio"] = baseline_rate / storescp_rate if baseline_rate and storescp_rate else None
        rows.append(row)
    return rows


def _target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The large-image ratio target, and the small-image rate target when more than one size ran."""
    large = max(rows, key=lambda r: r["file_bytes"])
    small = min(rows, key=lambda r: r["file_bytes"])
    ratio = large["ratio"]
    target: dict[str, Any] = {
        "size": large["size"],
        "min_ratio": TARGET_RATIO,
        "ratio": ratio,
        "pass": ratio is not None and ratio >= TARGET_RATIO,
    }
    if small is not large:
        rate = small["chexd"]["images_per_s"]
        target["small"] = {
            "size": small["size"],
            "min_images_per_s": TARGET_SMALL_RATE,
            "images_per_s": rate,
            "pass": rate is not None and rate >= TARGET_SMALL_RATE,
        }
    return target


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    machine = report["machine"]
    console.print(f"command: {report['command']}", highlight=False)
    console.print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['mem_gib']} GiB RAM, "
        f"Linux {machine['kernel']}; Python {machine['python']}, pynetdicom {machine['pynetdicom']}, "
        f"{machine['dcmtk']}",
        highlight=False,
    )
    table = Table(
        title=f"C-STORE throughput, storescu -> receiver, median of {report['repeat']} (MB = 10^6 bytes)",
    )
    with_baseline = any("baseline" in row for row in report["results"])
    names = ("storescp", "chexd", "baseline") if with_baseline else ("storescp", "chexd")
    columns = [("image", "left"), ("file MB", "right"), ("copies", "right")]
    columns += [(f"{name} img/s (MB/s)", "right") for name in names]
    columns += [("chexd/storescp", "right")] + ([("baseline/storescp", "right")] if with_baseline else [])
    columns += [("target", "center")]
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    target = report["target"]
    small = target.get("small")
    for row in report["results"]:
        cells = []
        for name in names:
            result = row[name]
            cells.append(
                f"{_fmt(result['images_per_s'], '.1f')} ({_fmt(result['mb_per_s'], '.0f')})"
                if result["images_per_s"]
                else "[red]FAILED[/]"
            )
        verdict = "-"
        if row["size"] == target["size"]:
            verdict = f">= {TARGET_RATIO}x " + ("[green]PASS[/]" if target["pass"] else "[red]FAIL[/]")
        elif small is not None and row["size"] == small["size"]:
            verdict = f">= {TARGET_SMALL_RATE:g} img/s " + ("[green]PASS[/]" if small["pass"] else "[red]FAIL[/]")
        ratios = [row["ratio"]] + ([row.get("baseline_ratio")] if with_baseline else [])
        table.add_row(
            row["size"],
            f"{row['file_bytes'] / 1e6:.2f}",
            str(row["copies"]),
            *cells,
            *(_fmt(r, ".2f") + ("x" if r else "") for r in ratios),
            verdict,
        )
    console.print(table)
    nagle = "TCP_NODELAY=1" if report["dcmtk_env"] else "dcmtk default (Nagle on)"
    console.print(f"dcmtk tools ran with {nagle}.", highlight=False)
    console.print(
        "chexd fsyncs every file, its folder and the SQLite commit before answering; storescp does not fsync.",
        highlight=False,
    )
    for row in report["results"]:
        for name in names:
            for error in row[name]["errors"]:
                console.print(f"[red]{row['size']} {name}: {error}[/]", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.copies < 1 or args.repeat < 1:
        parser.error(f"Invalid --copies {args.copies} / --repeat {args.repeat} - both must be >= 1")
    if args.baseline is not None and not (args.baseline / "daemon" / "__main__.py").is_file():
        parser.error(f"Invalid --baseline {args.baseline} - not a chexd checkout (no daemon/__main__.py in it)")
    try:
        _check_tools()
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    global _DCMTK_ENV
    if args.dcmtk_nagle:
        _DCMTK_ENV = {}
    command = shlex.join(["python", "-m", "bench.store_throughput", *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="chexd-bench-"))
    try:
        rows = run(sizes, args.copies, args.repeat, work, args.baseline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "command": command,
        "machine": machine_info(),
        "copies": args.copies,
        "repeat": args.repeat,
        "dcmtk_env": dict(_DCMTK_ENV),
        "results": rows,
        "target": _target(rows),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    failed = any(row[name]["errors"] for row in rows for name in receivers(args.baseline) if name in row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

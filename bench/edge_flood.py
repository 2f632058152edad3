"""Flood bench: does a real modality still get through while loopback peers flood the DICOM port?

    python -m bench.edge_flood [--images 100] [--half-open 200] [--silent 200] [--addresses 40] [--json]

One ``chexd serve`` (defaults: ``max_associations`` 25, ``max_connections_per_address`` 10,
``association_request_timeout`` 10 s; no job worker) receives ``--images`` C-STOREs, one ``storescu`` call (one
association, one 512x512x16 image) after the other, in four scenarios:

1. **baseline** - no flood;
2. **flood, 1 address** - the attacker holds ``--half-open`` connections that send the first 6 bytes of an
   A-ASSOCIATE-RQ claiming 2 GiB and ``--silent`` connections that send nothing, all from 127.0.0.2, and reopens each
   one the daemon closes (at most ``--reopen-rate`` per second in total) for as long as the images are sent;
3. **flood, N addresses** - the same, spread over ``--addresses`` loopback addresses (127.0.0.2 ...; all of 127/8 is
   loopback on Linux), so the per-address cap does not stop it and the pending table (4 x max_associations) fills;
4. **1,000 open/close, then flood** - ``--burst`` connect-and-close connections first, then scenario 3.

storescu always comes from 127.0.0.1. The same flood is also run against pynetdicom 3.0.4's own server
(``AE.start_server``, a Storage SCP that stores nothing, ``maximum_associations`` 25): the off-the-shelf way.

Reported per scenario: successes, median and 95th-percentile per-image latency (wall clock of one storescu call,
process start included), the median's ratio to the baseline (target <= 2x), the daemon's RSS growth (peak during the
scenario minus the RSS before it; target < 100 MiB), the attacker's connections and the audit rows written.

Exit status: 0 when the run completed (targets met or not), 1 when it could not run (chexd did not start, tools
missing), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shlex
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.store_throughput import (
    REPO_ROOT,
    BenchError,
    ImageSize,
    _dcmtk_env,
    _free_port,
    _log,
    _stop,
    _tail,
    _wait_ready,
    machine_info,
    make_copies,
)

TARGET_LATENCY_RATIO = 2.0
TARGET_RSS_MIB = 100.0
HALF_OPEN = struct.pack(">BBL", 0x01, 0x00, 0x7FFFFFFF)  # A-ASSOCIATE-RQ header claiming 2 GiB, nothing after it
_STORESCU_TIMEOUT_S = 30.0

_PLAIN_SCP = """
import sys
from pynetdicom import AE, evt
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
ae = AE(ae_title="PLAIN")
ae.maximum_associations = 25
ae.add_supported_context(Verification)
ae.add_supported_context(DigitalXRayImageStorageForPresentation)
handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_C_ECHO, lambda event: 0x0000)]
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, evt_handlers=handlers)
"""


# --- the attacker ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class FloodStats:
    opened: int = 0
    closed_by_server: int = 0
    connect_failures: int = 0


class Flood(threading.Thread):
    """Holds ``half_open`` + ``silent`` connections to ``port`` spread over ``addresses`` and reopens each one the
    server closes, at most ``reopen_rate`` reopenings per second in total."""

    def __init__(self, port: int, half_open: int, silent: int, addresses: list[str], reopen_rate: float) -> None:
        super().__init__(name="flood", daemon=True)
        self.port = port
        self.slots = [(i < half_open, addresses[i % len(addresses)]) for i in range(half_open + silent)]
        self.reopen_rate = reopen_rate
        self.stats = FloodStats()
        self.ready = threading.Event()
        self._halt = threading.Event()
        self._selector = selectors.DefaultSelector()

    def _open(self, slot: int) -> bool:
        half_open, address = self.slots[slot]
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2, source_address=(address, 0))
            if half_open:
                sock.sendall(HALF_OPEN)
            sock.setblocking(False)
        except OSError:
            self.stats.connect_failures += 1
            return False
        self.stats.opened += 1
        self._selector.register(sock, selectors.EVENT_READ, slot)
        return True

    def run(self) -> None:
        waiting = [i for i in range(len(self.slots)) if not self._open(i)]
        self.ready.set()
        budget, last = 0.0, time.monotonic()
        while not self._halt.is_set():
            for key, _ in self._selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._selector.unregister(sock)
                    sock.close()
                    self.stats.closed_by_server += 1
                    waiting.append(key.data)
            now = time.monotonic()
            budget = min(budget + (now - last) * self.reopen_rate, self.reopen_rate)
            last = now
            while waiting and budget >= 1:
                budget -= 1
                slot = waiting.pop(0)
                if not self._open(slot):
                    waiting.append(slot)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def open_close_burst(port: int, count: int, address: str) -> None:
    for _ in range(count):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(address, 0)).close()
        except OSError:
            pass


# --- receivers -------------------------------------------------------------------------------------------------------


class RSSSampler(threading.Thread):
    """Peak VmRSS (MiB) of ``pid`` sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss", daemon=True)
        self.pid = pid
        self.peak = rss_mib(pid)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, ValueError):
                return

    def stop(self) -> float:
        self._halt.set()
        self.join(timeout=2)
        return self.peak


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


@dataclass
class Receiver:
    name: str
    ae_title: str
    port: int
    process: subprocess.Popen[bytes]
    database: Path | None = None

    def audit_rows(self) -> int | None:
        if self.database is None:
            return None
        with sqlite3.connect(self.database) as conn:
            return int(conn.execute("select count(*) from audit_events").fetchone()[0])


def start_chexd(work: Path) -> Receiver:
    data_dir = Path(tempfile.mkdtemp(prefix="chexd-", dir=work))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEXD_")}
    env.update(
        CHEXD_DATA_DIR=str(data_dir),
        CHEXD_PORT=str(port),
        CHEXD_BIND_ADDRESS="127.0.0.1",
        CHEXD_DISK_RESERVE_MB="0",
        CHEXD_WORKER_THREADS="0",
        CHEXD_REPORT_WORKERS="0",
    )
    log_path = work / "chexd.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve"], cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    _wait_ready(process, "CHEXD", port, log_path)
    return Receiver("chexd", "CHEXD", port, process, database=data_dir / "chexd.db")


def start_plain(work: Path) -> Receiver:
    port = _free_port()
    log_path = work / "plain.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _PLAIN_SCP, str(port)], cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT
        )
    _wait_ready(process, "PLAIN", port, log_path)
    return Receiver("pynetdicom", "PLAIN", port, process)


# --- one scenario ------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Scenario:
    name: str
    receiver: str  # chexd | pynetdicom
    addresses: int = 0  # 0: no flood
    burst: int = 0
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss_growth_mib: float | None = None
    flood: FloodStats | None = None
    audit_rows: int | None = None

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "name": self.name,
            "receiver": self.receiver,
            "attacker_addresses": self.addresses,
            "burst": self.burst,
            "successes": len(lat),
            "attempts": len(lat) + len(self.failures),
            "median_ms": statistics.median(lat) * 1000 if lat else None,
            "p95_ms": lat[max(0, round(0.95 * len(lat)) - 1)] * 1000 if lat else None,
            "rss_growth_mib": self.rss_growth_mib,
            "flood": vars(self.flood) if self.flood else None,
            "audit_rows": self.audit_rows,
            "first_failures": self.failures[:3],
        }


def send_one(receiver: Receiver, path: Path) -> tuple[float, str | None]:
    command = [
        "storescu", "-to", "10", "-ta", "10", "-td", "10", "-aec", receiver.ae_title, "127.0.0.1",
        str(receiver.port), str(path),
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_STORESCU_TIMEOUT_S, env=_dcmtk_env(), check=False
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, f"storescu timed out after {_STORESCU_TIMEOUT_S:.0f} s"
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        return elapsed, (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return elapsed, None


def run_scenario(
    scenario: Scenario, receiver: Receiver, images: list[Path], args: argparse.Namespace, give_up_after: int
) -> Scenario:
    """Send every image (stop early after ``give_up_after`` failures in a row, counting the rest as failed)."""
    before = rss_mib(receiver.process.pid)
    sampler = RSSSampler(receiver.process.pid)
    sampler.start()
    audit_before = receiver.audit_rows()
    flood = None
    if scenario.burst:
        open_close_burst(receiver.port, scenario.burst, "127.0.0.2")
    if scenario.addresses:
        addresses = [f"127.0.0.{2 + i}" for i in range(scenario.addresses)]
        flood = Flood(receiver.port, args.half_open, args.silent, addresses, args.reopen_rate)
        flood.start()
        flood.ready.wait(60)
    in_a_row = 0
    try:
        for index, path in enumerate(images):
            seconds, error = send_one(receiver, path)
            if error is None:
                scenario.latencies_s.append(seconds)
                in_a_row = 0
                continue
            scenario.failures.append(error)
            in_a_row += 1
            if in_a_row >= give_up_after:
                scenario.failures += ["not attempted"] * (len(images) - index - 1)
                break
    finally:
        if flood is not None:
            flood.stop()
            scenario.flood = flood.stats
        scenario.rss_growth_mib = sampler.stop() - before
    after = receiver.audit_rows()
    if after is not None and audit_before is not None:
        scenario.audit_rows = after - audit_before
    ok = len(scenario.latencies_s)
    _log(f"  {scenario.receiver:10s} {scenario.name:28s} {ok}/{len(images)} ok")
    return scenario


def run(args: argparse.Namespace, work: Path) -> list[Scenario]:
    folder = work / "images"
    _log(f"generating {args.images} x 512x512x16 ...")
    make_copies(ImageSize(rows=512, columns=512, bits=16), args.images, folder)
    images = sorted(folder.glob("*.dcm"))
    scenarios = []
    receiver = start_chexd(work)
    try:
        n = args.addresses
        for scenario in (
            Scenario(name="baseline (no flood)", receiver="chexd"),
            Scenario(name="flood, 1 address", receiver="chexd", addresses=1),
            Scenario(name=f"flood, {n} addresses", receiver="chexd", addresses=n),
            Scenario(name=f"{args.burst} open/close, then flood", receiver="chexd", addresses=n, burst=args.burst),
        ):
            scenarios.append(run_scenario(scenario, receiver, images, args, give_up_after=len(images)))
    finally:
        _stop(receiver.process)
    plain = start_plain(work)
    try:
        for scenario in (
            Scenario(name="baseline (no flood)", receiver="pynetdicom"),
            Scenario(name=f"flood, {n} addresses", receiver="pynetdicom", addresses=n),
        ):
            scenarios.append(run_scenario(scenario, plain, images, args, give_up_after=5))
    finally:
        _stop(plain.process)
    return scenarios


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    machine = report["machine"]
    console.print(f"command: {report['command']}", highlight=False)
    console.print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['mem_gib']} GiB RAM, Linux "
        f"{machine['kernel']}; Python {machine['python']}, pynetdicom {machine['pynetdicom']}, {machine['dcmtk']}",
        highlight=False,
    )
    table = Table(title="storescu from 127.0.0.1 (one association per 512x512x16 image) while loopback peers flood")
    for name in (
        "receiver", "scenario", "ok", "median ms", "p95 ms", "x baseline", "RSS +MiB",
        "attacker conns (closed by server)", "audit rows",
    ):  # fmt: skip
        table.add_column(name, justify="left" if name in ("receiver", "scenario") else "right")
    baselines = {r["receiver"]: r["median_ms"] for r in report["results"] if r["attacker_addresses"] == 0}
    for row in report["results"]:
        base = baselines.get(row["receiver"])
        ratio = row["median_ms"] / base if row["median_ms"] and base else None
        flood = row["flood"]
        table.add_row(
            row["receiver"],
            row["name"],
            f"{row['successes']}/{row['attempts']}",
            _fmt(row["median_ms"], ".0f"),
            _fmt(row["p95_ms"], ".0f"),
            _fmt(ratio, ".2f") + ("x" if ratio else ""),
            _fmt(row["rss_growth_mib"], ".1f"),
            f"{flood['opened']} ({flood['closed_by_server']})" if flood else "-",
            "-" if row["audit_rows"] is None else str(row["audit_rows"]),
        )
    console.print(table)
    console.print(
        f"flood: {report['half_open']} half-open (6-byte A-ASSOCIATE-RQ header claiming 2 GiB) + {report['silent']} "
        f"silent connections, each reopened when closed (<= {report['reopen_rate']:g}/s in total); attacker addresses "
        "127.0.0.2 ..., storescu from 127.0.0.1. Targets (chexd): every image stored, median <= "
        f"{TARGET_LATENCY_RATIO:g}x baseline, RSS growth < {TARGET_RSS_MIB:g} MiB.",
        highlight=False,
    )
    for row in report["results"]:
        for failure in row["first_failures"]:
            console.print(f"[red]{row['receiver']} / {row['name']}: {failure}[/]", highlight=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_flood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100, help="C-STOREs per scenario (default 100)")
    parser.add_argument("--half-open", type=int, default=200, help="half-open connections held (default 200)")
    parser.add_argument("--silent", type=int, default=200, help="silent connections held (default 200)")
    parser.add_argument("--addresses", type=int, default=40, help="attacker addresses in scenario 3 (default 40)")
    parser.add_argument("--burst", type=int, default=1000, help="open/close connections before scenario 4")
    parser.add_argument("--reopen-rate", type=float, default=200.0, help="attacker reopenings per second (200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.half_open < 0 or args.silent < 0 or not 1 <= args.addresses <= 250:
        parser.error("--images must be >= 1, --half-open/--silent >= 0, --addresses in 1..250")
    if args.reopen_rate <= 0 or args.burst < 0:
        parser.error(f"Invalid --reopen-rate {args.reopen_rate} / --burst {args.burst} - must be > 0 / >= 0")
    command = shlex.join(["python", "-m", "bench.edge_flood", *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="chexd-flood-"))
    try:
        scenarios = run(args, work)
    except BenchError as exc:
        print(f"error: {exc}\n{_tail(work / 'chexd.log')}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    report = {
        "command": command,
        "machine": machine_info(),
        "half_open": args.half_open,
        "silent": args.silent,
        "reopen_rate": args.reopen_rate,
        "results": [s.as_dict() for s in scenarios],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real Orthanc PACS (Debian package, ``/usr/sbin/Orthanc``) started by a test, with its REST API over urllib.

Each server has its own generated configuration in a temp folder: free DICOM and HTTP ports on 127.0.0.1, storage
and index in that folder, AE title ORTHANC, any calling AE may store, no plugins, no authentication (localhost
only). The system service, if any, is never used.

Tests take the session's server from the ``orthanc`` fixture (tests/conftest.py: one server per session, emptied
before each test with :meth:`OrthancServer.clear`); a test that needs a server of its own (e.g. one that is down
first and comes up later on the same ports) makes one::

    with OrthancServer(tmp_path / "orthanc") as pacs:      # or pacs = OrthancServer(...); pacs.start(); pacs.stop()
        ...C-STORE to ORTHANC@127.0.0.1:pacs.dicom_port...
        pacs.study_instances(study_uid)                    # SOP Instance UID -> SOP Class UID
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AE_TITLE = "ORTHANC"


class OrthancError(RuntimeError):
    """Orthanc did not start, or its REST API answered with an error."""


class OrthancServer:
    """One Orthanc process. Ports are chosen at construction, so a test can configure a destination before the
    server runs (and start it later on the same ports)."""

    def __init__(self, folder: Path, *, dicom_port: int | None = None, http_port: int | None = None) -> None:
        self.folder = Path(folder)
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        """This server as a chexd ``forward_destinations`` entry."""
        return f"{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def config(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        return {
            "Name": "chexd-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,  # any calling AE may C-STORE (Orthanc >= 1.5)
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "UnknownSopClassAccepted": False,
            "DicomThreadsCount": 2,
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "ExecuteLuaEnabled": False,
        }

    def start(self, timeout: float = 30) -> OrthancServer:
        """Start and wait until ``GET /system`` answers. Raises OrthancError with the log when it does not."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                system = self.get("/system")
            except (OSError, OrthancError):
                time.sleep(0.1)
                continue
            if system.get("DicomPort") != self.dicom_port:
                raise OrthancError(f"another server answers on port {self.http_port}: {system}")
            return self
        self.stop()
        raise OrthancError(f"Orthanc did not answer on {self.url}/system within {timeout}s:\n{self.log()}")

    def stop(self, *, graceful: bool = False) -> None:
        """Kill the server (its storage is a throw-away temp folder; a graceful stop takes Orthanc ~3 s), or with
        ``graceful`` send SIGTERM and wait for it to close its database."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if graceful:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- REST ---------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def clear(self) -> None:
        """Delete every patient (with its studies, series and instances) through the REST API; afterwards
        ``statistics()`` counts nothing. Raises OrthancError when something is left."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")
        left = self.statistics()
        if left["CountInstances"] or left["CountStudies"] or left["CountPatients"]:
            raise OrthancError(f"Orthanc still holds data after deleting every patient: {left}")

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    def find_study(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None."""
        ids = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        return ids[0] if ids else None

    def study_instances(self, study_uid: str) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID of every instance Orthanc filed in this study (empty when none)."""
        study = self.find_study(study_uid)
        if study is None:
            return {}
        out = {}
        for instance in self.get(f"/studies/{study}/instances"):
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags["SOPClassUID"]
        return out

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")

"""End to end: the applicability gate (issue 14) in a daemon running the bundled demo model.

A real chest radiograph (../shared/data/real-cxr, the SIIM DICOM) is outside the synthetic demo model's validated
domain; a phantom image is inside it. One module-scoped daemon per policy (withhold, the default; flag; off) receives
both by storescu; the tests read what it stored (``chexd show --json``), reported (PDF text, SR content) and counts
(``chexd status --json``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from daemon.store import queries
from daemon.store.db import session_factory
from daemon.store.tables import StudyReportRow
from model.phantom import generate, to_dicom
from reporting.report import DomainCheck
from tests.conftest import REAL_CXR, DaemonProcess, running_daemon
from tests.integration.peers import wait_until_processed

pytestmark = pytest.mark.slow  # a daemon with the demo model per policy

SIIM = REAL_CXR / "siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm"
HEADLINE = "outside the model's validated domain — no AI findings for this image"


@dataclass
class Run:
    policy: str
    daemon: DaemonProcess
    real: dict[str, Any]  # chexd show --json of the real radiograph's study
    phantom: dict[str, Any]  # ... of the phantom's study
    status: dict[str, Any]  # chexd status --json

    def text(self, shown: dict[str, Any], kind: str) -> str:
        """The newest report's document of ``kind`` as text (pdf: pdftotext; sr: its TEXT and CODE items)."""
        (path,) = [f["path"] for f in shown["reports"][-1]["files"] if f["kind"] == kind]
        path = self.daemon.data_dir / path
        if kind == "pdf":
            out = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True).stdout
            return " ".join(out.split())
        return _sr_text(pydicom.dcmread(path))

    def kinds(self, shown: dict[str, Any]) -> list[str]:
        return sorted(f["kind"] for f in shown["reports"][-1]["files"])


def _sr_text(ds: pydicom.Dataset) -> str:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(item.TextValue)
        elif item.ValueType == "CODE":
            out.append(item.ConceptCodeSequence[0].CodeValue)
        out.append(_sr_text(item))
    return " ".join(o for o in out if o)


def _wait_reports(daemon: DaemonProcess, n: int, timeout: float = 90) -> None:
    engine = daemon.engine()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                states = conn.scalars(select(StudyReportRow.state)).all()
            if sum(s == "DONE" for s in states) >= n:
                return
            time.sleep(0.3)
        raise AssertionError(f"{n} reports not written within {timeout}s: {states}\n{daemon.log()[-3000:]}")
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["withhold", "flag", "off"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    policy = request.param
    folder = tmp_path_factory.mktemp(f"gate-{policy}")
    phantom = folder / "phantom.dcm"
    to_dicom(generate(0, 0, size=384, force={"Effusion": True})).save_as(phantom, enforce_file_format=True)
    with running_daemon(
        folder / "data", applicability=policy, report_quiet_seconds="0.3", report_workers="0", model_device="cpu",
        model="demo",
    ) as daemon:
        assert daemon.storescu("-xy", str(SIIM)).returncode == 0  # JPEG baseline, sent as it is
        assert daemon.storescu(str(phantom)).returncode == 0
        engine = daemon.engine()
        assert sorted(wait_until_processed(engine, 2).values()) == ["DONE", "DONE"], daemon.log()[-3000:]
        engine.dispose()
        _wait_reports(daemon, 2)

        engine = daemon.engine()
        sessions = session_factory(engine)

        def show(path: Path) -> dict[str, Any]:  # what 'chexd show UID --json' prints (the CLI is run below)
            study = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            return queries.show(sessions, study)

        try:
            yield Run(
                policy=policy,
                daemon=daemon,
                real=show(SIIM),
                phantom=show(phantom),
                status=queries.queue_summary(sessions),
            )
        finally:
            engine.dispose()


def _prediction(shown: dict[str, Any]) -> dict[str, Any]:
    (instance,) = shown["instances"]
    return instance["predictions"][-1]


def test_the_real_radiograph_is_withheld_flagged_or_unchecked_as_the_policy_says(run: Run) -> None:
    prediction = _prediction(run.real)
    gate = prediction["applicability"]
    pdf, sr = run.text(run.real, "pdf"), run.text(run.real, "sr")
    if run.policy == "off":  # no check, no score stored: the findings as before
        assert gate is None and len(prediction["findings"]) == 14
        assert "validated domain" not in pdf and "OUT-OF-DOMAIN" not in sr
        return
    assert gate["score"] > gate["threshold"], "the synthetic demo model's validation never saw a real radiograph"
    score = DomainCheck.from_dict(gate | {"method": ""}).score_text()  # "applicability score S above the threshold T"
    assert score.lower() in pdf.lower() and score in sr
    assert "OUT-OF-DOMAIN" in sr
    if run.policy == "withhold":
        assert gate["status"] == "withheld"
        assert prediction["findings"] == []  # no finding rows
        assert HEADLINE[0].upper() + HEADLINE[1:] in pdf and HEADLINE in sr
        assert "Main region" not in pdf and "Heat by zone" not in pdf
        assert run.kinds(run.real) == ["epdf", "pdf", "sr"]  # no heatmap SC
    else:
        assert gate["status"] == "flagged"
        assert len(prediction["findings"]) == 14
        assert "WARNING: outside the model's validated domain" in pdf and "no AI findings" not in pdf


def test_the_phantom_gets_its_findings_under_every_policy(run: Run) -> None:
    prediction = _prediction(run.phantom)
    gate = prediction["applicability"]
    if run.policy == "off":
        assert gate is None
    else:
        assert gate["status"] == "in_domain" and gate["score"] <= gate["threshold"] and gate["quality"] == []
        assert "within the model's validated domain" in run.text(run.phantom, "pdf")
    statuses = {f["label"]: f["status"] for f in prediction["findings"]}
    assert statuses["Effusion"] == "present"
    assert "sc" in run.kinds(run.phantom)


def test_status_and_show_count_withheld_and_flagged_images(run: Run) -> None:
    counts = run.status["applicability"]
    expected = {"withhold": {"withheld": 1, "in_domain": 1}, "flag": {"flagged": 1, "in_domain": 1}, "off": {"off": 2}}[
        run.policy
    ]
    assert {k: v for k, v in counts.items() if v} == expected
    if run.policy == "off":
        return  # the CLI's own tests cover its tables without the gate
    table = " ".join(run.daemon.cli("status").stdout.split())
    shown = " ".join(run.daemon.cli("show", run.real["uid"]).stdout.split())
    if run.policy == "withhold":
        assert "withheld 1" in table and "(1 withheld)" in shown
        assert "applicability: withheld, score" in shown and "no AI findings for this image" in shown
    else:
        assert "flagged 1" in table and "(1 flagged)" in shown and "findings with a warning" in shown

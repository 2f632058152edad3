"""Patient identity: keyed fingerprints, the store's never-merge decisions (SQLite and real PostgreSQL), re-index,
show/reprocess of held images, and the report-assembly guard."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import daemon.store.instances
from daemon.edge.intake import InstanceMeta, inspect
from daemon.settings import Settings
from daemon.store import queries
from daemon.store.db import create_db_engine, session_factory, upgrade_to_head
from daemon.store.identity import (
    IdentityKey,
    IdentityKeyError,
    MixedPatientsError,
    PatientIdentity,
    check_one_patient,
    fingerprint_difference,
)
from daemon.store.instances import InstanceStore, StoreOutcome, dataset_sha256
from daemon.store.recovery import reindex
from daemon.store.spool import Spool
from daemon.store.tables import (
    AuditEvent,
    ConflictKind,
    IdentityConflict,
    Instance,
    Job,
    PredictionRow,
    ReportState,
    Series,
    Study,
    StudyReportRow,
)
from daemon.work.reports import ReportLoop, archive_path, mark_pending, save_archive
from model.types import LABELS, Prediction
from tests.dicomgen import make_dataset, write_dataset

# --- fingerprints ---------------------------------------------------------------------------------------------------


def _ds(**attrs: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture
def key(tmp_path: Path) -> IdentityKey:
    return IdentityKey.load(tmp_path / "identity.key")


def test_key_file_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "identity.key"
    first = IdentityKey.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    IdentityKey._cache.clear()  # a restart reads the same file
    again = IdentityKey.load(path)
    ds = _ds(PatientID="12345")
    assert again.fingerprint(PatientIdentity.from_dataset(ds)) == first.fingerprint(PatientIdentity.from_dataset(ds))


def test_a_damaged_key_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_text("not hex at all")
    with pytest.raises(IdentityKeyError, match=r"expected 64 hex digits; restore it from a backup"):
        IdentityKey.load(path)


def test_fingerprint_is_keyed_and_holds_no_patient_data(key: IdentityKey, tmp_path: Path) -> None:
    identity = PatientIdentity.from_dataset(_ds(PatientID="MRN-778899", PatientName="DOE^JANE"))
    fingerprint = key.fingerprint(identity)
    assert fingerprint.startswith(f"id:{key.key_id}:") and len(fingerprint) == 76
    assert "778899" not in fingerprint and "DOE" not in fingerprint
    assert "778899" not in repr(identity) and "DOE" not in repr(identity)
    other_key = IdentityKey.load(tmp_path / "other" / "identity.key")
    assert other_key.fingerprint(identity) != fingerprint
    assert "another identity key" in (fingerprint_difference(fingerprint, other_key.fingerprint(identity)) or "")


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ({"PatientID": "123 "}, {"PatientID": "123"}, True),  # LO padding
        ({"PatientID": "123", "PatientName": "A^B"}, {"PatientID": "123", "PatientName": "X^Y"}, True),
        ({"PatientID": "123"}, {"PatientID": "124"}, False),
        ({"PatientID": "123"}, {"PatientID": "0123"}, False),  # leading zeros are not removed: held, not merged
        ({"PatientID": "123", "IssuerOfPatientID": "A"}, {"PatientID": "123", "IssuerOfPatientID": "B"}, False),
        ({"PatientName": "doe^jane^^", "PatientBirthDate": "19700101"},
         {"PatientName": "DOE^JANE", "PatientBirthDate": "19700101"}, True),
        ({"PatientName": "DOE^JANE", "PatientBirthDate": "19700101"},
         {"PatientName": "DOE^JANE", "PatientBirthDate": "19700102"}, False),
        ({"PatientName": "DOE^JANE"}, {"PatientID": "123", "PatientName": "DOE^JANE"}, False),
        ({}, {"PatientID": "123"}, False),
        ({"PatientID": "  "}, {}, True),  # blank is no identity
    ],
)
def test_normalisation_merges_padding_never_different_values(
    key: IdentityKey, first: dict[str, str], second: dict[str, str], same: bool
) -> None:
    a = key.fingerprint(PatientIdentity.from_dataset(_ds(**first)))
    b = key.fingerprint(PatientIdentity.from_dataset(_ds(**second)))
    assert (a == b) is same
    assert (fingerprint_difference(a, b) is None) is same


def test_no_identity_is_its_own_basis(key: IdentityKey) -> None:
    assert key.fingerprint(PatientIdentity.from_dataset(_ds())) == "none"
    assert fingerprint_difference("none", key.fingerprint(PatientIdentity.from_dataset(_ds(PatientID="1")))) == (
        "the study's images have no patient identity; this image has PatientID"
    )


# --- the store's decisions (SQLite and PostgreSQL) -------------------------------------------------------------------


@dataclass
class Env:
    sessions: sessionmaker[Session]
    spool: Spool
    store: InstanceStore
    files: Path

    def count(self, table: type, *where: object) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(table).where(*where)) or 0

    def image(self, *, source: pydicom.Dataset | None = None, **kw: object) -> tuple[InstanceMeta, bytes]:
        """A real Part 10 file from dicomgen (or ``source``) and the meta the C-STORE edge would extract."""
        ds = source if source is not None else make_dataset(rows=8, columns=8, **kw)  # type: ignore[arg-type]
        path = write_dataset(ds, self.files / f"{generate_uid()}.dcm")
        back = pydicom.dcmread(path)
        return inspect(back, ExplicitVRLittleEndian), path.read_bytes()

    def conflicts(self) -> list[tuple[str, str]]:
        with self.sessions() as session:
            rows = session.execute(select(IdentityConflict.kind, IdentityConflict.reason).order_by(IdentityConflict.id))
            return [(ConflictKind(k).value, r) for k, r in rows]

    def quarantined(self) -> list[Path]:
        return sorted(self.spool.quarantine.glob("*.dcm"))


@pytest.fixture
def env(head_db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = create_db_engine(head_db_url)
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    spool = Spool(tmp_path / "data" / "spool", tmp_path / "data" / "quarantine")
    files = tmp_path / "files"
    files.mkdir()
    yield Env(sessions, spool, InstanceStore(spool, sessions), files)
    engine.dispose()


def test_second_patient_in_a_known_study_is_held_never_merged(env: Env) -> None:
    study = generate_uid()
    first, first_bytes = env.image(study_uid=study, patient_id="P1")
    second, second_bytes = env.image(study_uid=study, patient_id="P2")
    assert env.store.save(first, first_bytes, "CR01") is StoreOutcome.STORED
    called: list[bool] = []
    assert env.store.save(second, second_bytes, "CR02", after_commit=lambda: called.append(True)) is (
        StoreOutcome.CONFLICT
    )
    assert called == [], "no job, nothing woken"
    assert env.conflicts() == [("study", "StudyInstanceUID already belongs to another patient (PatientID differs)")]
    assert env.count(Instance) == 1 and env.count(Job) == 1, "the existing study is untouched"
    assert not env.store.exists(second.sop_instance_uid)
    [held] = env.quarantined()
    assert held.read_bytes() == second_bytes
    reason = held.with_name(held.name.removesuffix(".dcm") + ".reason.txt").read_text()
    assert "PatientID differs" in reason and second.sop_instance_uid in reason and "P2" not in reason
    with env.sessions() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.event == "identity_conflict")).one()
        assert (event.sop_instance_uid, event.calling_ae) == (second.sop_instance_uid, "CR02")
        assert held.name in (event.detail or "")
    assert list(env.spool.tmp.iterdir()) == []
    # the same patient's next image still joins the study
    third, third_bytes = env.image(study_uid=study, patient_id="P1")
    assert env.store.save(third, third_bytes, "CR01") is StoreOutcome.STORED
    assert env.count(Instance) == 2


def test_series_reused_by_another_study_is_held_and_creates_no_study(env: Env) -> None:
    series = generate_uid()
    first, first_bytes = env.image(series_uid=series)
    second, second_bytes = env.image(series_uid=series)  # same patient, new study, reused series UID
    assert env.store.save(first, first_bytes, None) is StoreOutcome.STORED
    assert env.store.save(second, second_bytes, None) is StoreOutcome.CONFLICT
    assert env.conflicts() == [
        (
            "series",
            f"SeriesInstanceUID already belongs to another study ({first.study_instance_uid}; "
            "StudyInstanceUID differs)",
        )
    ]
    assert env.count(Study) == 1 and env.count(Instance) == 1
    shown = queries.show(env.sessions, second.study_instance_uid)
    assert shown["level"] == "conflict" and shown["instances"] == []
    assert [c["sop_instance_uid"] for c in shown["conflicts"]] == [second.sop_instance_uid]


def test_sop_resent_with_another_patients_content_is_quarantined_and_audited(env: Env) -> None:
    uid = generate_uid()
    first, first_bytes = env.image(sop_uid=uid, patient_id="P1")
    other, other_bytes = env.image(sop_uid=uid, patient_id="P2", seed=3)
    assert env.store.save(first, first_bytes, None) is StoreOutcome.STORED
    assert env.store.save(other, other_bytes, None) is StoreOutcome.CONFLICT
    [(kind, reason)] = env.conflicts()
    assert kind == "sop"
    assert reason == (
        "SOPInstanceUID already stored with different content (sha256 differs; another patient: PatientID differs)"
    )
    [held] = env.quarantined()
    assert held.read_bytes() == other_bytes
    stored = env.spool.root / f"{first.study_instance_uid}/{first.series_instance_uid}/{uid}.dcm"
    assert stored.read_bytes() == first_bytes, "the stored instance is never overwritten"
    assert env.count(AuditEvent, AuditEvent.event == "identity_conflict") == 1


def test_identical_resend_is_a_silent_duplicate_even_from_another_ae(env: Env) -> None:
    meta, data = env.image()
    assert env.store.save(meta, data, "CR01") is StoreOutcome.STORED
    assert env.store.save(meta, data, "CR01") is StoreOutcome.DUPLICATE
    # the same dataset behind another file meta header (another sender's AE title in it) is the same content
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ds.file_meta.SourceApplicationEntityTitle = "PACS"
    relabelled = env.files / "relabelled.dcm"
    ds.save_as(relabelled, enforce_file_format=True)
    assert relabelled.read_bytes() != data
    tmp = env.files / "orig.dcm"
    tmp.write_bytes(data)
    assert dataset_sha256(relabelled) == dataset_sha256(tmp)
    assert env.store.save(meta, relabelled.read_bytes(), "PACS") is StoreOutcome.DUPLICATE
    assert env.conflicts() == [] and env.quarantined() == []
    with env.sessions() as session:
        assert len(session.scalar(select(Instance.sha256)) or "") == 64


def test_images_without_identity_never_join_an_identified_study_and_vice_versa(env: Env) -> None:
    identified, anonymous = generate_uid(), generate_uid()
    cases = [
        (identified, "P1", "", StoreOutcome.STORED),
        (identified, "", "", StoreOutcome.CONFLICT),
        (anonymous, "", "", StoreOutcome.STORED),
        (anonymous, "", "", StoreOutcome.STORED),  # two images without identity: one unverifiable study
        (anonymous, "P1", "", StoreOutcome.CONFLICT),
    ]
    for study, patient_id, name, expected in cases:
        meta, data = env.image(study_uid=study, patient_id=patient_id, patient_name=name, patient_birth_date="")
        assert env.store.save(meta, data, None) is expected, (study == identified, patient_id)
    assert [reason for _, reason in env.conflicts()] == [
        "StudyInstanceUID already belongs to another patient (this image has no patient identity; the study's "
        "images have PatientID)",
        "StudyInstanceUID already belongs to another patient (the study's images have no patient identity; this "
        "image has PatientID)",
    ]


def test_without_patient_id_name_and_birth_date_identify(env: Env) -> None:
    study = generate_uid()
    for name, birth, expected in [
        ("DOE^JANE", "19700101", StoreOutcome.STORED),
        ("doe^jane^", "19700101", StoreOutcome.STORED),
        ("DOE^JANE", "19800101", StoreOutcome.CONFLICT),
        ("ROE^RICHARD", "19700101", StoreOutcome.CONFLICT),
    ]:
        meta, data = env.image(study_uid=study, patient_id="", patient_name=name, patient_birth_date=birth)
        assert env.store.save(meta, data, None) is expected, (name, birth)
    assert {reason for _, reason in env.conflicts()} == {
        "StudyInstanceUID already belongs to another patient (no PatientID; PatientName/PatientBirthDate differ)"
    }


def test_a_conflict_the_database_cannot_record_leaves_nothing_and_raises(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0xA700 at the edge means nothing kept: the held bytes and their reason file are removed again, the sender
    resends, and the conflict is recorded then."""
    study = generate_uid()
    first, first_bytes = env.image(study_uid=study, patient_id="P1")
    second, second_bytes = env.image(study_uid=study, patient_id="P2")
    env.store.save(first, first_bytes, None)

    def broken(**kwargs: object) -> None:
        raise OperationalError("INSERT INTO identity_conflicts", {}, Exception("server closed the connection"))

    monkeypatch.setattr(daemon.store.instances, "IdentityConflict", broken)
    with pytest.raises(SQLAlchemyError):
        env.store.save(second, second_bytes, None)
    assert list(env.spool.quarantine.iterdir()) == [] and list(env.spool.tmp.iterdir()) == []
    monkeypatch.undo()
    assert env.store.save(second, second_bytes, None) is StoreOutcome.CONFLICT
    assert len(env.quarantined()) == 1 and env.count(IdentityConflict) == 1


def test_a_study_from_before_fingerprints_is_claimed_by_its_next_image(env: Env) -> None:
    study = generate_uid()
    first, first_bytes = env.image(study_uid=study, patient_id="P1")
    env.store.save(first, first_bytes, None)
    with env.sessions.begin() as session:  # as revision 0004 leaves existing studies
        session.execute(update(Study).values(patient_fingerprint=None))
    second, second_bytes = env.image(study_uid=study, patient_id="P1")
    third, third_bytes = env.image(study_uid=study, patient_id="P2")
    assert env.store.save(second, second_bytes, None) is StoreOutcome.STORED
    assert env.store.save(third, third_bytes, None) is StoreOutcome.CONFLICT


def _race(env: Env, images: list[tuple[InstanceMeta, bytes]]) -> tuple[list[StoreOutcome], list[BaseException]]:
    """Save each image from its own thread and its own InstanceStore (as two nodes would), released together."""
    stores = [InstanceStore(env.spool, env.sessions) for _ in images]
    barrier = threading.Barrier(len(images))
    outcomes: list[StoreOutcome] = []
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            barrier.wait()
            outcomes.append(stores[i].save(*images[i], None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes, errors


def test_two_patients_racing_for_one_new_study_never_both_create_it(env: Env) -> None:
    """Two stores (two nodes: separate locks) send two patients' images with one new Study UID at the same moment:
    exactly one owns the study, the other is held - whichever way the database orders them."""
    checked = 0
    for _ in range(3):
        study = generate_uid()
        outcomes, errors = _race(env, [env.image(study_uid=study, patient_id=f"P{i}", seed=i) for i in range(2)])
        if errors and "database is locked" in str(errors[0]):
            continue  # SQLite refused the second writer (0xA700 at the edge: the sender retries) - nothing merged
        assert not errors, errors
        assert sorted(o.value for o in outcomes) == ["conflict", "stored"]
        with env.sessions() as session:
            n = session.scalar(
                select(func.count()).select_from(Instance).join(Series).join(Study)
                .where(Study.study_instance_uid == study)
            )
        assert n == 1
        checked += 1
    assert checked >= 1
    assert list(env.spool.tmp.iterdir()) == []


def test_reindex_moves_a_conflicting_orphan_to_quarantine_not_into_the_study(env: Env) -> None:
    study = generate_uid()
    first, first_bytes = env.image(study_uid=study, patient_id="P1")
    env.store.save(first, first_bytes, None)
    orphan, orphan_bytes = env.image(study_uid=study, patient_id="P2")  # renamed into place, then a crash
    rel = env.spool.relative_path(study, orphan.series_instance_uid, orphan.sop_instance_uid)
    (env.spool.root / rel).parent.mkdir(parents=True)
    (env.spool.root / rel).write_bytes(orphan_bytes)
    assert reindex(env.spool, env.sessions) == (0, 1)
    assert not (env.spool.root / rel).exists()
    assert env.count(Instance) == 1 and [k for k, _ in env.conflicts()] == ["study"]
    assert [p.read_bytes() for p in env.quarantined()] == [orphan_bytes]
    assert reindex(env.spool, env.sessions) == (0, 0), "a second start-up finds nothing to adopt"


def test_reprocess_leaves_held_images_held(env: Env) -> None:
    study = generate_uid()
    first, first_bytes = env.image(study_uid=study, patient_id="P1")
    second, second_bytes = env.image(study_uid=study, patient_id="P2")
    env.store.save(first, first_bytes, None)
    env.store.save(second, second_bytes, None)
    assert queries.reprocess(env.sessions, second.sop_instance_uid) == {"requeued": 0, "skipped": 0, "conflicts": 1}
    assert queries.reprocess(env.sessions, study) == {"requeued": 1, "skipped": 0, "conflicts": 1}
    assert env.count(Instance) == 1 and env.count(IdentityConflict) == 1
    summary = queries.queue_summary(env.sessions)
    assert summary["conflicts"]["held"] == 1
    assert summary["conflicts"]["last"][0]["sop_instance_uid"] == second.sop_instance_uid
    shown = queries.show(env.sessions, study)
    assert shown["patient_identified_by"] == "PatientID"
    assert [i["sop_instance_uid"] for i in shown["instances"]] == [first.sop_instance_uid]
    assert [c["state"] for c in shown["conflicts"]] == ["CONFLICT"]


# --- the report-assembly guard ----------------------------------------------------------------------------------------


def test_guard_refuses_images_of_two_patients_naming_uids_not_values() -> None:
    study = generate_uid()
    a = make_dataset(rows=8, columns=8, study_uid=study, patient_id="P-111")
    b = make_dataset(rows=8, columns=8, study_uid=study, patient_id="P-222")
    check_one_patient([("1", a), ("2", a)])
    with pytest.raises(MixedPatientsError, match="different patients") as raised:
        check_one_patient([(str(a.SOPInstanceUID), a), (str(b.SOPInstanceUID), b)])
    assert str(b.SOPInstanceUID) in str(raised.value) and "P-222" not in str(raised.value)
    c = make_dataset(rows=8, columns=8, patient_id="P-111")
    with pytest.raises(MixedPatientsError, match="StudyInstanceUID differs"):
        check_one_patient([("1", a), ("3", c)])


def test_a_report_whose_files_disagree_on_the_patient_fails_with_the_reason(db_url: str, tmp_path: Path) -> None:
    """Rows say one study, the files say two patients (e.g. merged before this check existed): the report fails
    once with the reason, is audited, and writes nothing."""
    engine = create_db_engine(db_url)
    upgrade_to_head(engine)
    sessions = session_factory(engine)
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, report_workers=0)
    spool = Spool(settings.spool_dir, settings.quarantine_dir, 0)
    loop = ReportLoop(sessions, spool, settings)
    study_uid, series_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    with sessions.begin() as session:
        study = Study(study_instance_uid=study_uid, patient_fingerprint="none")
        series = Series(series_instance_uid=series_uid, study=study)
        session.add_all([study, series])
        for n, patient in enumerate(("P-111", "P-222")):
            ds = make_dataset(rows=16, columns=16, study_uid=study_uid, series_uid=series_uid, patient_id=patient)
            rel = spool.relative_path(study_uid, series_uid, str(ds.SOPInstanceUID))
            (spool.root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_dataset(ds, spool.root / rel)
            instance = Instance(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                series=series, transfer_syntax_uid=str(ExplicitVRLittleEndian), path=rel,
                                size_bytes=1)
            logits = rng.normal(size=14).astype(np.float32)
            session.add(PredictionRow(instance=instance, model_name="m", model_version="v1", probabilities={},
                                      logits={}))
            save_archive(
                archive_path(settings.data_dir, str(ds.SOPInstanceUID), "v1"),
                Prediction(labels=LABELS, probabilities=(1 / (1 + np.exp(-logits))).astype(np.float32),
                           logits=logits, cams=np.zeros((14, 4, 4), np.float32),
                           top_channels=np.zeros((14, 3), np.int32), top_contributions=np.zeros((14, 3), np.float32),
                           bias=np.zeros(14, np.float32), model_version="v1"),
                {"version": "v1", "thresholds": {label: 0.5 for label in LABELS}},
            )
            assert n in (0, 1)
        session.flush()
        mark_pending(session, study.id, quiet_seconds=0, model_version="v1")
    assert loop.run_one()
    with sessions() as session:
        report = session.scalars(select(StudyReportRow)).one()
        assert report.state == ReportState.FAILED
        assert "MixedPatientsError: images of one report belong to different patients" in (report.error or "")
        assert "P-222" not in (report.error or "")
        assert not report.files
        event = session.scalars(select(AuditEvent).where(AuditEvent.event == "report_failed_identity")).one()
        assert "PatientID differs" in (event.detail or "")
    assert not (settings.data_dir / "reports").exists() or not list((settings.data_dir / "reports").rglob("*.pdf"))
    engine.dispose()

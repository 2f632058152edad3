"""The model registry: every model version chexd knows, which one is active, and the maintenance-job log.

Maintenance jobs (calibrate, correct, finetune, compress, decide) never change the active model: each writes a new
artifact and registers it as a *candidate*; an admin activates it (``chexd model activate``), and the running daemon
switches to it between jobs (see :class:`daemon.work.inference.ActiveModelProcessor`). Registered artifacts are copied
under ``<data_dir>/models/<name>-<hash12>/`` so a version stays usable when its source file moves.

Until something has been activated, the active model is ``settings.model_path`` or the bundled demo model. The daemon
records that model as the active *baseline* row when it starts (:func:`register_baseline`: a ``model_versions`` row and
a ``model_activated`` audit event, then a ``daemon_started`` event naming the model it serves), before any image is
analysed, reported or forwarded; a registration does the same if it comes first, so rollback always has somewhere to
go. Reading the registry (``chexd model list``, ``show``, ``diff``) never writes: not even a migration.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url, select
from sqlalchemy.orm import Session, sessionmaker

from daemon.errors import DaemonError
from daemon.settings import Settings
from daemon.store.db import create_db_engine, current_revision, head_revision, session_factory, upgrade_to_head
from daemon.store.tables import AdminJob, AuditEvent, ModelState, ModelVersion, utcnow
from model.errors import ModelError
from model.manifest import ArtifactError, Manifest, read_manifest, sha256_file

log = logging.getLogger(__name__)

__all__ = [
    "AdminJobHandle",
    "ModelVersionInfo",
    "RegistryError",
    "activate",
    "active_model_path",
    "active_version",
    "admin_job",
    "find_version",
    "list_versions",
    "register_baseline",
    "register_candidate",
    "rollback",
]


# The default demo is the compressed DenseNet121 (bench/README.md, `compress`); the full one ships beside it for
# comparison ("chexd model import bundled:full").
BUNDLED = {"compressed": "chexd-demo-compressed.json", "full": "chexd-demo.json"}


def bundled_demo_model(which: str = "compressed") -> Path | None:
    """A demo artifact's manifest inside the installed package (``which``: ``compressed``, the default model, or
    ``full``), or None when this build ships none. Raises ValueError for another ``which``."""
    if which not in BUNDLED:
        raise ValueError(f"Invalid bundled model {which!r} - expected one of {', '.join(BUNDLED)}")
    candidate = resources.files("model") / "demo" / BUNDLED[which]
    return Path(str(candidate)) if candidate.is_file() else None


def resolve_model_path(settings: Settings) -> Path | None:
    """The configured artifact, else the bundled demo. Raises ModelError for a configured path that is missing."""
    if settings.model_path:
        path = Path(settings.model_path).expanduser()
        if not path.exists():
            raise ModelError(f"model_path {path} does not exist - import a checkpoint with 'chexd model import'")
        return path
    return bundled_demo_model()


class RegistryError(DaemonError, LookupError):
    """A version is unknown, ambiguous, or cannot be registered or activated; the message says which and why."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelVersionInfo:
    """One registry row. ``version`` is the manifest's ``version_id`` (a hash of weights, thresholds and
    preprocessing); ``path`` is the registered copy of the manifest."""

    id: int
    version: str
    name: str
    path: Path
    state: str
    parent_version: str | None
    operation: str
    parameters: dict[str, Any]
    metrics: dict[str, Any]
    synthetic: bool
    created_at: datetime
    activated_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "name": self.name,
            "path": str(self.path),
            "state": self.state,
            "parent_version": self.parent_version,
            "operation": self.operation,
            "parameters": self.parameters,
            "metrics": self.metrics,
            "synthetic": self.synthetic,
            "created_at": self.created_at.isoformat(timespec="seconds"),
            "activated_at": self.activated_at.isoformat(timespec="seconds") if self.activated_at else None,
        }


def _info(row: ModelVersion) -> ModelVersionInfo:
    return ModelVersionInfo(
        id=row.id,
        version=row.version,
        name=row.name,
        path=Path(row.manifest_path),
        state=ModelState(row.state).value,
        parent_version=row.parent_version,
        operation=row.operation,
        parameters=dict(row.parameters or {}),
        metrics=dict(row.metrics or {}),
        synthetic=row.synthetic,
        created_at=row.created_at,
        activated_at=row.activated_at,
    )


# --- database access ---------------------------------------------------------------------------------------------

_ENGINES: dict[str, Engine] = {}


def registry_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the configured database, upgraded to the head revision once per process."""
    url = settings.effective_database_url
    engine = _ENGINES.get(url)
    if engine is None:
        engine = create_db_engine(url)
        upgrade_to_head(engine)
        _ENGINES[url] = engine
    return session_factory(engine)


def _reading_sessions(settings: Settings) -> sessionmaker[Session]:
    """Sessions for reading only: the database must already be at the head revision (nothing is migrated or
    created). Raises RegistryError naming the database and what to run otherwise."""
    url = settings.effective_database_url
    engine = _ENGINES.get(url)
    if engine is None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            if not Path(parsed.database).is_file():  # connecting would create the file
                raise RegistryError(
                    f"database {settings.masked()['database_url']} does not exist: nothing is registered yet - "
                    "start 'chexd serve' (it registers its model) or run 'chexd db upgrade'"
                )
        engine = create_db_engine(url)
        current = current_revision(engine)
        if current != head_revision():
            engine.dispose()
            raise RegistryError(
                f"database {settings.masked()['database_url']} is at revision {current or '(empty)'}, not "
                f"{head_revision()}: nothing is registered yet - start 'chexd serve' (it registers its model) "
                "or run 'chexd db upgrade'"
            )
        _ENGINES[url] = engine
    return session_factory(engine)


def current_user() -> str:
    """The OS user running the command (the sudo caller when run under sudo)."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# --- artifacts -----------------------------------------------------------------------------------------------------


def _copy_artifact(settings: Settings, manifest_path: Path) -> tuple[Path, Manifest]:
    """Verify an artifact and copy it to ``<data_dir>/models/<name>-<hash12>/``; return (new manifest, manifest)."""

    try:
        manifest = read_manifest(manifest_path)
    except (ArtifactError, OSError, ValueError) as exc:
        raise RegistryError(f"cannot register {manifest_path}: {exc}") from None
    json_path = manifest_path if manifest_path.suffix == ".json" else manifest_path / f"{manifest.name}.json"
    if not json_path.is_file():
        candidates = sorted(manifest_path.glob("*.json")) if manifest_path.is_dir() else []
        json_path = candidates[0] if len(candidates) == 1 else json_path
    weights = json_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise RegistryError(f"cannot register {json_path}: its weights file {weights.name} is missing")
    if sha256_file(weights) != manifest.weights_sha256:
        raise RegistryError(f"cannot register {json_path}: {weights.name} does not match the manifest's sha256")
    target = settings.data_dir / "models" / f"{manifest.name}-{manifest.short_hash}"
    final = target / f"{manifest.name}.json"
    if final.is_file() and read_manifest(final).version_id == manifest.version_id:
        return final, manifest
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    try:
        shutil.copy2(weights, staging / f"{manifest.name}.safetensors")
        shutil.copy2(json_path, staging / f"{manifest.name}.json")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, manifest


def _parent_version(session: Session, manifest: Manifest) -> str | None:
    """The registered version the artifact was made from. Provenance names the parent by its weights' sha256, which
    several versions can share (recalibrations): prefer the active one, then the newest; unregistered parents are
    named by the first 16 hex digits of that hash."""
    parent = next((str(p["parent_sha256"]) for p in reversed(manifest.provenance) if p.get("parent_sha256")), None)
    if parent is None:
        return None
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.weights_sha256 == parent).order_by(ModelVersion.id.desc())
    ).all()
    rows = [r for r in rows if r.version != manifest.version_id]
    active = [r for r in rows if r.state == ModelState.ACTIVE]
    return (active or rows)[0].version if (active or rows) else parent[:16]


def _add_row(
    session: Session,
    settings: Settings,
    manifest_path: Path,
    *,
    operation: str,
    parameters: dict[str, Any],
    metrics: dict[str, Any] | None,
    state: ModelState,
) -> ModelVersion:
    path, manifest = _copy_artifact(settings, manifest_path)
    version = manifest.version_id
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is not None:
        return row
    row = ModelVersion(
        version=version,
        name=manifest.name,
        weights_sha256=manifest.weights_sha256,
        manifest_path=str(path),
        parent_version=_parent_version(session, manifest),
        operation=operation,
        parameters=parameters,
        metrics=metrics if metrics is not None else dict(manifest.metrics),
        synthetic=manifest.synthetic,
        state=state,
        activated_at=utcnow() if state is ModelState.ACTIVE else None,
    )
    session.add(row)
    session.flush()
    return row


def _ensure_baseline(session: Session, settings: Settings) -> ModelVersion | None:
    """The active row; when there is none yet, record the configured/bundled model as the active baseline."""
    active = session.scalar(select(ModelVersion).where(ModelVersion.state == ModelState.ACTIVE))
    if active is not None:
        return active

    path = resolve_model_path(settings)
    if path is None:
        return None
    source = "model_path" if settings.model_path else "bundled demo"
    row = _add_row(
        session,
        settings,
        path,
        operation="baseline",
        parameters={"source": source},
        metrics=None,
        state=ModelState.ACTIVE,
    )
    if row.state is not ModelState.ACTIVE:  # the baseline was already registered as a candidate
        row.state = ModelState.ACTIVE
        row.activated_at = utcnow()
    session.add(
        AuditEvent(event="model_activated", detail=f"version {row.version} ({source} baseline) by {current_user()}")
    )
    return row


# --- public API ----------------------------------------------------------------------------------------------------


def active_model_path(settings: Settings) -> Path | None:
    """Manifest of the active model: the registry's active version, else ``model_path``, else the bundled demo."""
    with registry_sessions(settings)() as session:
        row = session.scalar(select(ModelVersion).where(ModelVersion.state == ModelState.ACTIVE))
        if row is not None:
            return Path(row.manifest_path)

    return resolve_model_path(settings)


def active_version(sessions: sessionmaker[Session]) -> tuple[str, Path] | None:
    """(version, manifest path) of the registry's active row, or None before anything was registered. Cheap: the
    daemon calls it between jobs to notice an activation."""
    with sessions() as session:
        row = session.execute(
            select(ModelVersion.version, ModelVersion.manifest_path).where(ModelVersion.state == ModelState.ACTIVE)
        ).first()
    return (row[0], Path(row[1])) if row else None


def register_candidate(
    settings: Settings,
    manifest_path: Path,
    *,
    operation: str,
    parameters: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Copy a freshly written artifact into the data dir and record it as a candidate (idempotent per weights hash).

    Raises RegistryError when the artifact is unreadable or its weights do not match its manifest."""
    with registry_sessions(settings).begin() as session:
        _ensure_baseline(session, settings)
        row = _add_row(
            session,
            settings,
            Path(manifest_path),
            operation=operation,
            parameters=dict(parameters or {}),
            metrics=metrics,
            state=ModelState.CANDIDATE,
        )
        session.add(
            AuditEvent(event="model_registered", detail=f"version {row.version} ({operation}) by {current_user()}")
        )
        return _info(row)


def register_baseline(sessions: sessionmaker[Session], settings: Settings) -> ModelVersionInfo | None:
    """At daemon start, before any job: record the model the daemon will serve as the active baseline when nothing is
    active yet (a ``model_versions`` row and a ``model_activated`` audit event), then audit ``daemon_started`` with
    the active version. Returns the active version, or None when no model is configured or bundled.

    Raises RegistryError when the configured artifact is unreadable or its weights do not match its manifest."""
    with sessions.begin() as session:
        row = _ensure_baseline(session, settings)
        info = _info(row) if row is not None else None
        what = f"model {row.version} ({row.name}, {row.operation}) active" if row is not None else "no model"
        session.add(AuditEvent(event="daemon_started", detail=f"{what}; by {current_user()}"))
    return info


def list_versions(settings: Settings) -> list[ModelVersionInfo]:
    """Every registered version, newest first; read-only (the daemon records its baseline when it starts).
    Raises RegistryError when the database is not at the head revision (e.g. nothing ever started)."""
    with _reading_sessions(settings)() as session:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc()))
        return [_info(row) for row in rows]


def find_version(settings: Settings, ref: str) -> ModelVersionInfo:
    """A version by id number, version prefix (≥ 4 hex digits) or ``active``. Raises RegistryError."""
    versions = list_versions(settings)
    if ref == "active":
        matches = [v for v in versions if v.state == ModelState.ACTIVE.value]
    elif ref.isdigit() and len(ref) < 4:
        matches = [v for v in versions if v.id == int(ref)]
    else:
        if len(ref) < 4:
            raise RegistryError(f"version {ref!r} is too short - give at least 4 hex digits or the id number")
        matches = [v for v in versions if v.version.startswith(ref.lower())]
        if not matches and ref.isdigit():
            matches = [v for v in versions if v.id == int(ref)]
    if not matches:
        raise RegistryError(f"no model version {ref!r} - 'chexd model list' shows the registered versions")
    if len(matches) > 1:
        raise RegistryError(f"version {ref!r} is ambiguous: {', '.join(v.version for v in matches)}")
    return matches[0]


def activate(settings: Settings, ref: str, *, reason: str = "activate") -> tuple[ModelVersionInfo, str | None]:
    """Make a version active (the previous active one becomes retired). Loads the artifact first, so a broken one
    is refused while the current model stays active. Returns (new active, previous active version or None)."""
    from model.artifact import ArtifactError, load_artifact

    with registry_sessions(settings).begin() as session:
        _ensure_baseline(session, settings)  # a write command: the baseline is recorded if the daemon never ran
    target = find_version(settings, ref)
    try:
        load_artifact(target.path)
    except (ArtifactError, OSError, ValueError) as exc:
        raise RegistryError(f"cannot activate {target.version}: {exc}") from None
    with registry_sessions(settings).begin() as session:
        previous = session.scalar(select(ModelVersion).where(ModelVersion.state == ModelState.ACTIVE))
        row = session.get(ModelVersion, target.id)
        assert row is not None
        before = previous.version if previous is not None else None
        if previous is not None and previous.id != row.id:
            previous.state = ModelState.RETIRED
        row.state = ModelState.ACTIVE
        row.activated_at = utcnow()
        session.add(
            AuditEvent(
                event="model_activated",
                detail=f"version {row.version} ({reason}; previous {before or 'none'}) by {current_user()}",
            )
        )
        session.flush()
        return _info(row), before


def rollback(settings: Settings) -> tuple[ModelVersionInfo, str | None]:
    """Re-activate the version that was active before the current one. Raises RegistryError when there is none."""
    with registry_sessions(settings).begin() as session:
        _ensure_baseline(session, settings)
    versions = list_versions(settings)
    current = next((v for v in versions if v.state == ModelState.ACTIVE.value), None)
    earlier = [
        v
        for v in versions
        if v.state == ModelState.RETIRED.value
        and v.activated_at is not None
        and (current is None or current.activated_at is None or v.activated_at <= current.activated_at)
    ]
    if not earlier:
        raise RegistryError("nothing to roll back to: no version was active before the current one")
    previous = max(earlier, key=lambda v: (v.activated_at, v.id))
    return activate(settings, previous.version, reason="rollback")


# --- maintenance-job log -----------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class AdminJobHandle:
    """Yielded by :func:`admin_job`; set ``result`` (JSON-able) before the block ends, or ``state = "refused"``."""

    id: int
    kind: str
    result: dict[str, Any] | None = None
    state: str = "done"
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def admin_job(settings: Settings, kind: str, parameters: dict[str, Any] | None = None) -> Iterator[AdminJobHandle]:
    """Record a maintenance job: a ``running`` row now; ``done`` (or the handle's state) with its result and
    duration when the block ends, or ``failed`` with the error when it raises (the exception propagates)."""
    sessions = registry_sessions(settings)
    with sessions.begin() as session:
        row = AdminJob(
            kind=kind,
            state="running",
            parameters=dict(parameters or {}),
            user=current_user(),
            host=socket.gethostname(),
        )
        session.add(row)
        session.flush()
        handle = AdminJobHandle(id=row.id, kind=kind)
    start = time.monotonic()
    state, error = "failed", None
    try:
        yield handle
        state = handle.state
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        state = "refused" if handle.state == "refused" else "failed"
        raise
    finally:
        with sessions.begin() as session:
            job = session.get(AdminJob, handle.id)
            if job is not None:
                job.state = state
                job.result = handle.result
                job.error = error
                job.finished_at = utcnow()
                job.duration_s = round(time.monotonic() - start, 3)
        log.info("admin job %s %s id=%d", kind, state, handle.id)

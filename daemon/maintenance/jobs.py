"""The admin-job record every maintenance job runs inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.maintenance.errors import MaintenanceError

if TYPE_CHECKING:
    from daemon.settings import Settings
    from daemon.store.registry import AdminJobHandle

__all__ = ["run_job"]

T = TypeVar("T")


def run_job(settings: Settings, kind: str, params: Mapping[str, Any], work: Callable[[AdminJobHandle], T]) -> T:
    """``work(job)`` inside an admin-job record of ``kind`` (``running`` now; ``done``, ``refused`` (set
    ``job.state``) or ``failed`` when it ends). Expected failures (model, data, registry, database, file errors and
    ValueError) are re-raised as MaintenanceError with an actionable message; the job row says ``failed``."""
    from sqlalchemy.exc import SQLAlchemyError

    from daemon.store.registry import RegistryError, admin_job
    from model.errors import ModelError

    try:
        with admin_job(settings, kind, dict(params)) as job:
            return work(job)
    except MaintenanceError:
        raise
    except (ModelError, ValueError, RegistryError) as exc:
        raise MaintenanceError(str(exc)) from exc
    except SQLAlchemyError as exc:
        raise MaintenanceError(f"database error: {exc.__class__.__name__}: {exc.args[0] if exc.args else exc}") from exc
    except OSError as exc:
        raise MaintenanceError(f"cannot {kind}: {exc}") from exc

"""The ``chexd`` command line. Every command reads settings the same way (``--config``, ``CHEXD_*``)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from daemon import (
    calibrate_cli,
    channels_cli,
    compress_cli,
    correct_cli,
    decide_cli,
    exclusions_cli,
    forward_cli,
    paper_cli,
    phantom_cli,
    queries,
    scu,
    train_cli,
)
from daemon.console import err, fail, out
from daemon.db import (
    DatabaseError,
    create_db_engine,
    current_revision,
    head_revision,
    session_factory,
    upgrade_to_head,
)
from daemon.model_cli import model_app
from daemon.settings import Settings, SettingsError, ensure_data_dir, load_settings


class _App(typer.Typer):
    """The ``chexd`` app: an error a person can act on, raised by any command, ends as one ``error:`` line on stderr
    and a non-zero exit status (2: a setting or the data folder; 1: the database, the model, a file) - never a
    traceback. Anything else is a bug and keeps its traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError

        from model.errors import ModelError

        try:
            return super().__call__(*args, **kwargs)
        except SettingsError as exc:
            _exit(str(exc), 2)
        except (DatabaseError, OperationalError, InterfaceError, ArgumentError) as exc:
            cfg = _State.settings
            where = f" {cfg.masked()['database_url']}" if cfg else ""
            reason = str(exc.args[0] if exc.args else exc).strip().splitlines()[0]
            _exit(f"cannot use the database{where}: {type(exc).__name__}: {reason} - check database_url and that "
                  "the server is running", 1)
        except ModelError as exc:
            _exit(str(exc), 1)
        except OSError as exc:
            if exc.filename is None:
                raise
            _exit(f"{exc.strerror or exc}: {exc.filename}", 1)


def _exit(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(code)


app = _App(
    help="chexd - DICOM chest radiograph reporting daemon. The bundled demo model is synthetic: NOT FOR DIAGNOSIS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic) commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")
app.command("train")(train_cli.train)
app.command("evaluate")(train_cli.evaluate)
app.command("phantom")(phantom_cli.phantom)
app.command("forward")(forward_cli.forward)
app.command("exclusions")(exclusions_cli.exclusions)
app.command("channels")(channels_cli.channels)
app.command("calibrate")(calibrate_cli.calibrate)
app.command("correct")(correct_cli.correct)
app.command("finetune")(correct_cli.finetune)
app.command("compress")(compress_cli.compress)
app.command("paper-table")(paper_cli.paper_table)
app.command("decide")(decide_cli.decide)


@app.command("feedback")
def feedback_cmd(
    uid: Annotated[str, typer.Argument(help="SOP Instance UID of a received image.")],
    finding: Annotated[str, typer.Option("--finding", "-f", help="Finding name, e.g. Pneumonia.")],
    present: Annotated[
        bool | None, typer.Option("--present/--absent", help="The radiologist's verdict (required).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Free-text comment.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Record a radiologist's verdict on one finding of one image (validation data for maintenance jobs)."""
    from daemon.feedback import FeedbackError, record
    from daemon.registry import current_user

    if present is None:
        fail("say --present or --absent", 2)
    try:
        row = record(sessions(settings()), uid, finding, present=present, user=current_user(), note=note)
    except FeedbackError as exc:
        fail(str(exc))
    if as_json:
        emit_json({"id": row.id, "sop_instance_uid": uid, "finding": row.finding, "present": row.present})
    else:
        out.print(f"recorded: {row.finding} {'present' if present else 'absent'} on {uid}", highlight=False)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML settings file (default: $CHEXD_CONFIG or <data_dir>/chexd.toml)"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class _State:
    config: Path | None = None
    settings: Settings | None = None  # the last settings loaded: names the database in a top-level error


def settings() -> Settings:
    """The effective settings, with a usable data folder (created if missing). A bad setting or an unusable data
    folder ends the command with exit status 2 and a message naming the setting, the value and the rule."""
    try:
        cfg = load_settings(_State.config)
        ensure_data_dir(cfg.data_dir)
    except SettingsError as exc:
        fail(str(exc), 2)
    _State.settings = cfg
    return cfg


def sessions(cfg: Settings, *, migrate: bool = False):  # type: ignore[no-untyped-def]
    """A session factory for the configured database, which must be at the head revision."""
    engine = create_db_engine(cfg.effective_database_url)
    try:
        if migrate:
            upgrade_to_head(engine)
        else:
            current = current_revision(engine)
            if current != head_revision():
                fail(
                    f"database {cfg.masked()['database_url']} is at revision {current or '(empty)'}, "
                    f"not {head_revision()} - run 'chexd db upgrade' (or start 'chexd serve', which upgrades)"
                )
    except SQLAlchemyError as exc:
        reason = exc.args[0] if exc.args else exc
        fail(f"cannot use database {cfg.masked()['database_url']}: {exc.__class__.__name__}: {reason}")
    return session_factory(engine)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.callback()
def main(config: ConfigOption = None) -> None:
    _State.config = config


@app.command()
def serve() -> None:
    """Run the daemon: upgrade the database, recover, then accept DICOM associations until SIGTERM/SIGINT."""
    cfg = settings()  # before importing the daemon (torch: seconds), so a bad setting fails at once
    from daemon.service import Daemon, configure_logging

    configure_logging(cfg.log_level)
    try:
        daemon = Daemon(cfg)
    except (DatabaseError, OSError) as exc:
        fail(str(exc))
    err.print(
        f"chexd: AE title {cfg.ae_title}, port {cfg.port}, data in {cfg.data_dir}, "
        f"database {cfg.masked()['database_url']}",
        highlight=False,
    )
    try:
        daemon.serve_forever()
    except OSError as exc:
        where = "" if exc.filename else f" - listening on bind_address {cfg.bind_address!r}, port {cfg.port}"
        fail(f"cannot start: {exc}{where}")
    except SQLAlchemyError as exc:
        fail(f"database error at start-up: {exc}")
    except LookupError as exc:  # daemon.registry.RegistryError: the model to serve cannot be registered
        fail(f"cannot start: {exc}")


@app.command("config")
def config_cmd(as_json: JsonOption = False) -> None:
    """Print the effective settings (database password masked)."""
    values = settings().masked()
    if as_json:
        emit_json(values)
        return
    table = Table("setting", "value", title="effective settings")
    for key, value in values.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Queue by state, the last errors, and free disk in the spool."""
    cfg = settings()
    summary = queries.queue_summary(sessions(cfg), forward_destinations=cfg.forward_destinations)
    spool_root = cfg.spool_dir if cfg.spool_dir.exists() else cfg.data_dir
    usage = shutil.disk_usage(spool_root if spool_root.exists() else Path.cwd())
    summary["disk"] = {
        "path": str(spool_root),
        "free_mb": usage.free // 2**20,
        "reserve_mb": cfg.disk_reserve_mb,
        "below_reserve": usage.free < cfg.disk_reserve_mb * 2**20,
    }
    if as_json:
        emit_json(summary)
        return
    table = Table("state", "jobs", title=f"{summary['instances']} instances in {summary['studies']} studies")
    for state, count in summary["jobs"].items():
        table.add_row(state, str(count))
    held = summary["conflicts"]["held"]
    table.add_row("[bold red]CONFLICT[/]" if held else "CONFLICT", str(held))
    out.print(table)
    reports = summary.get("reports", {})
    if any(reports.values()):
        out.print("reports: " + ", ".join(f"{k.lower()} {v}" for k, v in reports.items() if v), highlight=False)
    gate = summary.get("applicability", {})
    if any(gate.values()):
        out.print("applicability (images): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in gate.items() if v)
                  + (" - withheld: outside the model's validated domain, no AI findings" if gate.get("withheld")
                     else ""), highlight=False)
    disk = summary["disk"]
    warn = " [bold red]BELOW RESERVE - new images are refused (0xA700)[/]" if disk["below_reserve"] else ""
    out.print(f"free disk: {disk['free_mb']} MiB (reserve {disk['reserve_mb']} MiB){warn}")
    forward_cli.print_summary(summary["forwards"], out)
    if held:
        conflicts = Table(
            "SOP Instance UID", "Study Instance UID", "reason",
            title=f"{held} image(s) held by an identity conflict, never merged (README: Patient identity conflicts)",
        )
        for c in summary["conflicts"]["last"]:
            conflicts.add_row(c["sop_instance_uid"], c["study_instance_uid"], c["reason"])
        out.print(conflicts)
    if summary["last_errors"]:
        errors = Table("SOP Instance UID", "state", "attempts", "error", title="last errors")
        for e in summary["last_errors"]:
            errors.add_row(e["sop_instance_uid"], e["state"], str(e["attempts"]), e["error"] or "")
        out.print(errors)


@app.command()
def studies(
    as_json: JsonOption = False, limit: Annotated[int, typer.Option(help="Most recent N studies.")] = 100
) -> None:
    """Studies received, most recent first."""
    rows = queries.list_studies(sessions(settings()), limit=limit)
    if as_json:
        emit_json(rows)
        return
    table = Table("Study Instance UID", "date", "series", "images", "jobs", "last received")
    for r in rows:
        jobs = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["jobs"].items()))
        table.add_row(
            r["study_instance_uid"],
            r["study_date"] or "",
            str(r["series"]),
            str(r["instances"]),
            jobs,
            r["last_received"] or "",
        )
    out.print(table)


@app.command("show")
def show_cmd(uid: str, as_json: JsonOption = False) -> None:
    """Everything stored for a study, series or SOP instance UID."""
    try:
        data = queries.show(sessions(settings()), uid)
    except queries.NotFoundError as exc:
        fail(str(exc))
    if as_json:
        emit_json(data)
        return
    gate = data.get("applicability") or {}
    counted = ", ".join(f"{gate[k]} {k}" for k in ("withheld", "flagged") if gate.get(k))
    out.print(f"{data['level']} {uid}: {len(data['instances'])} instance(s)" + (f" ({counted})" if counted else ""),
              highlight=False)
    if data.get("patient_identified_by"):
        out.print(f"patient identified by: {data['patient_identified_by']} (kept as a keyed fingerprint)",
                  highlight=False)
    for c in data.get("conflicts", []):
        table = Table(show_header=False, title=f"{c['sop_instance_uid']} - CONFLICT: held, not merged")
        for key in ("state", "kind", "reason", "study_instance_uid", "series_instance_uid", "quarantine_file",
                    "sha256", "size_bytes", "calling_ae", "received_at"):
            table.add_row(key, str(c[key]) if c[key] is not None else "")
        out.print(table)
    for inst in data["instances"]:
        job = inst["job"] or {}
        table = Table(show_header=False, title=inst["sop_instance_uid"])
        for key in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_class_uid",
            "modality",
            "body_part",
            "view_position",
            "transfer_syntax_uid",
            "path",
            "size_bytes",
            "calling_ae",
            "received_at",
            "skip_reason",
        ):
            table.add_row(key, str(inst[key]) if inst[key] is not None else "")
        table.add_row("job", f"{job.get('state')} (attempts {job.get('attempts')})")
        if job.get("error"):
            table.add_row("error", job["error"])
        if inst["image_stats"]:
            table.add_row("image stats", json.dumps(inst["image_stats"]))
        out.print(table)
        for prediction in inst["predictions"][-1:]:
            findings = Table(
                "finding",
                "probability",
                "threshold",
                "status",
                "region",
                "reason",
                title=f"model {prediction['model_name']} {prediction['model_version']}"
                + (" - SYNTHETIC DEMO MODEL, NOT FOR DIAGNOSIS" if prediction["synthetic_model"] else ""),
            )
            for f in prediction["findings"]:
                findings.add_row(
                    f["label"],
                    f"{f['probability']:.3f}",
                    f"{f['threshold']:.3f}",
                    f["status"],
                    f["region"] or "",
                    f["reason"] or "",
                )
            gated = prediction.get("applicability")
            if gated:
                score = ("" if gated["score"] is None
                         else f", score {gated['score']:,.6g} (threshold {gated['threshold']:,.6g})")
                note = {"withheld": " - outside the model's validated domain, no AI findings for this image",
                        "flagged": " - outside the model's validated domain, findings with a warning"}
                out.print(f"applicability: {gated['status']}{score}{note.get(gated['status'], '')}", highlight=False)
                for issue in gated["quality"]:
                    out.print(f"  input quality ({issue['code']}): {issue['reason']}", highlight=False)
            if prediction["findings"]:
                out.print(findings)
    for report in data["reports"]:
        files = ", ".join(f"{f['kind']} {f['path']}" for f in report["files"])
        out.print(f"report revision {report['revision']}: {report['state'].lower()} {files}", highlight=False)


@app.command("reprocess")
def reprocess_cmd(uid: str, as_json: JsonOption = False) -> None:
    """Re-queue the jobs of a study, series or instance (a running daemon picks them up)."""
    try:
        result = queries.reprocess(sessions(settings()), uid)
    except queries.NotFoundError as exc:
        fail(str(exc))
    if result.get("conflicts") and not result["requeued"] and not result["skipped"]:
        fail(
            f"{uid}: {result['conflicts']} image(s) held by an identity conflict - not re-queued (they are never "
            "merged); fix the patient or study at the sender and resend with new UIDs (see 'chexd show UID')"
        )
    if as_json:
        emit_json(result)
        return
    held = f"; {result['conflicts']} image(s) held by an identity conflict, not re-queued" if result.get(
        "conflicts") else ""
    out.print(f"re-queued {result['requeued']} job(s); {result['skipped']} skipped instance(s) left as they are{held}")


TLS_HELP = "DICOM TLS: verify the peer with tls_ca, present tls_cert/tls_key (the settings forwarding uses)."


def tls_client_context() -> Any:
    """The client TLS context from the settings (daemon.tls.forward_context); fails with the reason."""
    from daemon.tls import forward_context

    try:
        return forward_context(settings())
    except (OSError, ValueError) as exc:
        fail(f"cannot set up TLS: {exc}")


@app.command("echo")
def echo_cmd(
    host: str,
    port: int,
    called_ae: Annotated[str, typer.Option("--aec", help="Called AE title.")] = "ANY-SCP",
    calling_ae: Annotated[str, typer.Option("--aet", help="Calling AE title.")] = "CHEXD-SCU",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 10,
    tls: Annotated[bool, typer.Option("--tls", help=TLS_HELP)] = False,
) -> None:
    """C-ECHO a DICOM node (verification)."""
    try:
        context = tls_client_context() if tls else None
        status_code = scu.echo(host, port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout, tls=context)
    except (scu.AssociationError, OSError, ValueError) as exc:
        fail(str(exc))
    if status_code != 0:
        fail(f"C-ECHO status 0x{status_code:04X}")
    out.print(f"C-ECHO {called_ae}@{host}:{port}: success (0x0000)", highlight=False)


@app.command("send")
def send_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively).")],
    host: Annotated[str, typer.Option(help="Destination host (default: this chexd).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Destination port (default: the configured port).")] = None,
    called_ae: Annotated[
        str | None, typer.Option("--aec", help="Called AE (default: the configured AE title).")
    ] = None,
    calling_ae: Annotated[str, typer.Option("--aet", help="Calling AE title.")] = "CHEXD-SCU",
    as_json: JsonOption = False,
    tls: Annotated[bool, typer.Option("--tls", help=TLS_HELP)] = False,
) -> None:
    """C-STORE DICOM files or folders (default: to this chexd), with a progress bar; exit 1 if any file failed."""
    cfg = settings()
    context = tls_client_context() if tls else None
    port = cfg.port if port is None else port
    called_ae = called_ae or cfg.ae_title
    try:
        files = scu.collect_files(paths)
    except FileNotFoundError as exc:
        fail(str(exc))
    if not files:
        fail("no files to send")
    progress = Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=as_json or not err.is_terminal,
    )
    with progress:
        task = progress.add_task("send", total=len(files))
        try:
            results = scu.send(
                files,
                host,
                port,
                called_ae=called_ae,
                calling_ae=calling_ae,
                on_result=lambda _r: progress.advance(task),
                tls=context,
            )
        except (scu.AssociationError, OSError, ValueError) as exc:
            fail(str(exc))
    failed = [r for r in results if not r.ok]
    if as_json:
        emit_json(
            [
                {
                    "path": str(r.path),
                    "sop_instance_uid": r.sop_instance_uid,
                    "status": None if r.status is None else f"0x{r.status:04X}",
                    "error": r.error,
                }
                for r in results
            ]
        )
    else:
        for r in failed:
            what = f"status 0x{r.status:04X}" if r.status is not None else r.error
            err.print(f"failed: {r.path}: {what}", highlight=False)
        out.print(f"sent {len(results) - len(failed)} of {len(results)} file(s)")
    if failed:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all pending schema migrations."""
    cfg = settings()
    try:
        revision = upgrade_to_head(create_db_engine(cfg.effective_database_url))
    except (SQLAlchemyError, DatabaseError) as exc:
        fail(f"upgrade failed: {exc}")
    out.print(f"database {cfg.masked()['database_url']} at revision {revision} (head)", highlight=False)


@db_app.command("current")
def db_current(as_json: JsonOption = False) -> None:
    """Show the database's schema revision and the head revision."""
    cfg = settings()
    try:
        current = current_revision(create_db_engine(cfg.effective_database_url))
    except (SQLAlchemyError, DatabaseError) as exc:
        fail(f"cannot read the database: {exc}")
    data = {"database_url": cfg.masked()["database_url"], "current": current, "head": head_revision()}
    if as_json:
        emit_json(data)
        return
    note = "" if current == data["head"] else "  (run 'chexd db upgrade')"
    out.print(f"current {current or '(empty)'}, head {data['head']}{note}", highlight=False)


if __name__ == "__main__":  # python -m daemon.cli works like python -m daemon
    app(prog_name="chexd")

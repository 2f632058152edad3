"""``chexd send PATHS``: C-STORE DICOM files or folders with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.console import err, fail, out
from daemon.cli.context import TLS_HELP, emit_json, settings, tls_client_context
from daemon.cli.options import JsonOption
from daemon.cli.progress import counter


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
    from daemon.edge import scu  # pynetdicom: only when the command runs

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
    progress = counter("sending", disable=as_json)
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

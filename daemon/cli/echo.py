"""``chexd echo HOST PORT``: C-ECHO a DICOM node."""

from __future__ import annotations

from typing import Annotated

import typer

from daemon.cli.console import fail, out
from daemon.cli.context import TLS_HELP, tls_client_context


def echo_cmd(
    host: str,
    port: int,
    called_ae: Annotated[str, typer.Option("--aec", help="Called AE title.")] = "ANY-SCP",
    calling_ae: Annotated[str, typer.Option("--aet", help="Calling AE title.")] = "CHEXD-SCU",
    timeout: Annotated[float, typer.Option(help="Seconds.")] = 10,
    tls: Annotated[bool, typer.Option("--tls", help=TLS_HELP)] = False,
) -> None:
    """C-ECHO a DICOM node (verification)."""
    from daemon.edge import scu  # pynetdicom: only when the command runs

    try:
        context = tls_client_context() if tls else None
        status_code = scu.echo(host, port, called_ae=called_ae, calling_ae=calling_ae, timeout=timeout, tls=context)
    except (scu.AssociationError, OSError, ValueError) as exc:
        fail(str(exc))
    if status_code != 0:
        fail(f"C-ECHO status 0x{status_code:04X}")
    out.print(f"C-ECHO {called_ae}@{host}:{port}: success (0x0000)", highlight=False)

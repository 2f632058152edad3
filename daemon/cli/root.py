"""The root ``chexd`` command: the global ``--config`` option, the one error handler every command ends in, and the
registration of every command. Each command's code lives in the module of its name (``chexd calibrate`` in
daemon/cli/calibrate.py, ``chexd model import`` in daemon/cli/model.py); what they share is in daemon/cli/context.py
(settings, database, JSON), options.py, progress.py and jobs.py (the maintenance layer's calls).
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from daemon.cli import (
    calibrate,
    channels,
    compress,
    config,
    correct,
    db,
    decide,
    echo,
    evaluate,
    exclusions,
    feedback,
    finetune,
    forward,
    health,
    model,
    paper_table,
    phantom,
    reprocess,
    send,
    serve,
    show,
    status,
    studies,
    train,
)
from daemon.cli.console import err
from daemon.cli.context import _State
from daemon.cli.exits import cli_exit
from daemon.cli.options import ConfigOption


class _App(typer.Typer):
    """The ``chexd`` app: an error a person can act on, raised by any command, ends as one ``error:`` line on stderr
    and a non-zero exit status (:func:`daemon.cli.exits.cli_exit`) - never a traceback. Anything else is a bug and keeps
    its traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            cfg = _State.settings
            outcome = cli_exit(exc, database=cfg.masked()["database_url"] if cfg else None)
            if outcome is None:
                raise
            err.print(f"[bold red]error:[/] {outcome.message}", highlight=False)
            sys.exit(outcome.code)


app = _App(
    help="chexd - DICOM chest radiograph reporting daemon. The bundled demo model is synthetic: NOT FOR DIAGNOSIS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(config: ConfigOption = None) -> None:
    _State.config = config


app.command("serve")(serve.serve)
app.command("config")(config.config_cmd)
app.command("status")(status.status)
app.command("health")(health.health)
app.command("studies")(studies.studies)
app.command("show")(show.show_cmd)
app.command("reprocess")(reprocess.reprocess_cmd)
app.command("echo")(echo.echo_cmd)
app.command("send")(send.send_cmd)
app.command("feedback")(feedback.feedback_cmd)
app.add_typer(db.db_app, name="db")
app.add_typer(model.model_app, name="model")
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("phantom")(phantom.phantom)
app.command("forward")(forward.forward)
app.command("exclusions")(exclusions.exclusions)
app.command("channels")(channels.channels)
app.command("calibrate")(calibrate.calibrate)
app.command("correct")(correct.correct)
app.command("finetune")(finetune.finetune)
app.command("compress")(compress.compress)
app.command("paper-table")(paper_table.paper_table)
app.command("decide")(decide.decide)

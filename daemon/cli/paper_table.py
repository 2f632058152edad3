"""``chexd paper-table``: every figure of the source paper's abstract that can be measured here, beside the paper's.

It runs the bundled SYNTHETIC demo pair (``chexd-demo``, a DenseNet121, and ``chexd-demo-compressed``) on the chest
phantom, and the real CheXNet predictions when ``--chexnet-preds`` (a folder holding ``preds.csv``) and
``--nih-labels`` (NIH's ``Data_Entry_2017*.csv(.gz)``) are given. One row per claim: value, 95% CI, the paper's
value, the data, a verdict (``daemon.maintenance.paper``, ``model.paper``). Nothing is written, registered or
activated; no database is used.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from daemon.cli.console import err, fail
from daemon.cli.console import out as stdout
from daemon.cli.jobs import guarded
from daemon.cli.progress import progress_reporter
from daemon.maintenance.paper import FULL, QUICK
from daemon.maintenance.paper import paper_table as measure


def _say(message: str) -> None:
    err.print(f"paper-table: {message}", highlight=False, markup=False)


def _preds_file(chexnet_preds: Path | None, nih_labels: Path | None) -> Path | None:
    if chexnet_preds is None:
        return None
    if nih_labels is None:
        fail("--chexnet-preds needs --nih-labels (the Data_Entry_2017 csv holds the labels and patient ids)", 2)
    path = chexnet_preds / "preds.csv" if chexnet_preds.is_dir() else chexnet_preds
    if not path.is_file():
        fail(f"--chexnet-preds {chexnet_preds}: no preds.csv there - expected a folder holding preds.csv (or the file)")
    if not nih_labels.is_file():
        fail(f"--nih-labels {nih_labels}: no such file - expected NIH's Data_Entry_2017 csv(.gz)")
    return path


# ------------------------------------------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ci(ci: list[float] | None) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"


_COLOURS = {
    "reproduced": "green",
    "not reproduced": "red",
    "true by construction": "yellow",
    "not measurable here": "dim",
}


def _print_table(data: dict[str, Any]) -> None:
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=200)
    table = Table(title="chexd paper-table: the paper's abstract, claim by claim", show_lines=True)
    table.add_column("claim (paper)", max_width=26)
    table.add_column("measured here", max_width=24)
    table.add_column("95% CI", max_width=20)
    table.add_column("paper", max_width=16)
    table.add_column("data", max_width=14)
    table.add_column("verdict", max_width=14)
    table.add_column("why", min_width=60, ratio=1)
    for r in data["rows"]:
        table.add_row(*_cells(r, f"[{_COLOURS[r['verdict']]}]{r['verdict']}[/]"))
    console.print(table)
    console.print(data["note"], highlight=False)


def _cells(r: dict[str, Any], verdict: str) -> tuple[str, ...]:
    """One row's cells, the same in the terminal table and in Markdown (``verdict`` already styled)."""
    unit = f" ({r['unit']})" if r["unit"] and r["value"] is not None else ""
    return (r["claim"], _fmt(r["value"]) + unit, _ci(r["ci"]), _fmt(r["paper_value"]), r["data"], verdict,
            r["reason"])


def _markdown(data: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| claim (paper) | measured here | 95% CI | paper | data | verdict | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append("| " + " | ".join(cell(x) for x in _cells(r, f"**{r['verdict']}**")) + " |")
    return "\n".join(lines) + f"\n\n{data['note']}\n"


def paper_table(
    chexnet_preds: Annotated[
        Path | None,
        typer.Option(
            "--chexnet-preds", help="Folder holding preds.csv: real CheXNet probabilities (prob_<Label> columns)."
        ),
    ] = None,
    nih_labels: Annotated[
        Path | None,
        typer.Option(
            "--nih-labels",
            help="NIH Data_Entry_2017 csv(.gz): labels and patients for --chexnet-preds, and the label "
            "co-occurrence for the polarized-channel row.",
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help=f"Small counts for CI ({QUICK.images} phantom images per split, {QUICK.n_bootstrap} "
            "bootstrap draws): well under a minute, wide intervals.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: rows + settings.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table.")] = False,
    images: Annotated[
        int | None,
        typer.Option(min=40, help=f"Phantom images per split (default {FULL.images}; --quick {QUICK.images})."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Phantom series, split and bootstrap seed.")] = 0,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="CPU threads for torch. On a busy 2-core machine one thread "
            "was 4x faster than two (threads waiting for each other).",
        ),
    ] = 1,
) -> None:
    """Regenerate each figure of the paper's abstract that can be measured here, beside the paper's value, with a
    95% CI and a verdict: reproduced / not reproduced / true by construction / not measurable here. Uses the bundled
    SYNTHETIC demo models on the phantom, and real CheXNet predictions with --chexnet-preds/--nih-labels."""
    if as_json and markdown:
        fail("choose one of --json and --markdown", 2)
    preds = _preds_file(chexnet_preds, nih_labels)
    plan = QUICK if quick else FULL
    if images is not None:
        plan = replace(plan, images=images)
    data = guarded(measure, plan, preds=preds, nih_labels=nih_labels, seed=seed, threads=threads, quick=quick,
                   say=_say, stages=progress_reporter)
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif markdown:
        sys.stdout.write(_markdown(data))
    else:
        _print_table(data)

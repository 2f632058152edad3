"""``chexd channels``: polarized classifier channels, their finding pairs' label statistics, and the null.

Reads the classifier weight [14, C] of the active model (or ``--model``), ranks channels by polarization score
(``daemon.maintenance.channels``, ``model.channels``), and reports for the top N the (positive, negative) finding
pair with its label Jaccard and lift, beside the base rate over all 91 pairs and a row-permutation null with its
p-value. Labels: ``--labels`` (an NIH ``Data_Entry_2017*.csv(.gz)`` or a 0/1-column CSV) or, by default, the phantom
validation split's labels (drawn without rendering a pixel). Read-only: no job row, no new model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from daemon.cli.console import out as stdout
from daemon.cli.context import settings
from daemon.cli.jobs import guarded
from daemon.cli.options import ArtifactOpt, JsonOpt

__all__ = ["channels"]

SYNTHETIC_LINE = "synthetic demo model, not for diagnosis: the channels describe what it learnt from phantom images"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(data: dict[str, Any], rows: int) -> None:
    console = stdout if stdout.is_terminal and stdout.width >= 120 else Console(width=120, highlight=False)
    model = data["model"]
    shown = data["channels"] if rows == 0 else data["channels"][:rows]
    title = (
        f"Polarized channels of {model['name']} {model['version']} - top {len(data['channels'])} of "
        f"{data['n_channels']} by min(max w, -min w)"
    )
    caption = f"Jaccard and lift: {data['label_source']}"
    if len(shown) < len(data["channels"]):
        caption += f"; showing {len(shown)} of {len(data['channels'])} (--rows 0 for all, --json for everything)"
    table = Table(box=box.SIMPLE_HEAD, title=title, caption=caption)
    for name in ("#", "Channel", "Score", "+ finding", "weight", "- finding", "weight", "Both", "Jaccard", "Lift"):
        table.add_column(name, justify="left" if "finding" in name else "right", no_wrap=True)
    for c in shown:
        lift = _fmt(c["lift"], 2) + ("" if c["lift_counted"] or c["lift"] is None else "*")
        table.add_row(
            str(c["rank"]),
            str(c["channel"]),
            f"{c['score']:.4f}",
            c["positive"],
            f"{c['positive_weight']:+.4f}",
            c["negative"],
            f"{c['negative_weight']:+.4f}",
            f"{c['n_both']:,}",
            _fmt(c["jaccard"], 4),
            lift,
        )
    console.print(table)
    if any(not c["lift_counted"] and c["lift"] is not None for c in shown):
        console.print(f"* lift not counted: fewer than {data['min_expected']:g} images with both expected")
    o, b, n = data["observed"], data["base_rate"], data["null"]
    cut = data["jaccard_cut"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ci(x: list[float] | None, percent: bool = False) -> str:
        if x is None:
            return ""
        return f" [{pct(x[0])}, {pct(x[1])}]" if percent else f" [{x[0]:.3f}, {x[1]:.3f}]"

    def pv(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2g}"

    console.print(
        f"Observed: Jaccard < {cut:g} in {o['jaccard_below']} of {o['jaccard_defined']} polarized channels "
        f"({pct(o['share_jaccard_below'])}), {o['distinct_pairs']} distinct finding pairs; mean lift "
        f"{_fmt(o['mean_lift'])} over {o['lift_defined']} channels (lift < 1 in {o['lift_below_one']})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"Null (a), all {b['pairs']} finding pairs: Jaccard < {cut:g} in {b['jaccard_below']} of "
        f"{b['jaccard_defined']} ({pct(b['share_jaccard_below'])}); mean lift {_fmt(b['mean_lift'])} over "
        f"{b['lift_defined']} pairs",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"Null (b), weight rows permuted across findings ({n['draws_used']:,} of {n['draws']:,} draws, seed "
        f"{n['seed']}): Jaccard share {pct(n['share_mean'])}{ci(n['share_interval'], True)}, p = "
        f"{pv(n['p_jaccard'])}; mean lift {_fmt(n['mean_lift_mean'])}{ci(n['mean_lift_interval'])}, "
        f"p = {pv(n['p_lift'])}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"'Polarized pairs co-occur less than chance' (one-sided, mean lift, alpha {data['alpha']:g}): "
        f"[bold]{data['verdict']}[/]",
        highlight=False,
        soft_wrap=True,
    )
    if model["synthetic"]:
        console.print(f"[yellow]{SYNTHETIC_LINE}[/]", highlight=False)


def channels(
    model: ArtifactOpt = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labels CSV for the pair statistics, e.g. NIH Data_Entry_2017_v2020.csv.gz (default: the "
            "phantom validation split's labels)."
        ),
    ] = None,
    count: Annotated[int, typer.Option(min=100, help="Phantom validation labels to draw (without --labels).")] = 10_000,
    phantom_seed: Annotated[int, typer.Option(min=0, help="Phantom series of those labels.")] = 0,
    top: Annotated[int, typer.Option(min=1, help="Polarized channels to analyse (highest score first).")] = 100,
    draws: Annotated[int, typer.Option(min=1, help="Row permutations in the null.")] = 10_000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the permutation null.")] = 0,
    min_expected: Annotated[
        float, typer.Option(min=0.0, help="A pair's lift counts only when this many images with both are expected.")
    ] = 5.0,
    rows: Annotated[int, typer.Option(min=0, help="Table rows to print (0: all top channels).")] = 25,
    as_json: JsonOpt = False,
) -> None:
    """Polarized classifier channels (strongly + for one finding, strongly - for another): their finding pairs'
    label Jaccard and lift, against all pairs and a weight-row permutation null, with a permutation p-value."""
    from daemon.maintenance.channels import analyse

    data = guarded(analyse, settings(), model, labels, count=count, phantom_seed=phantom_seed, top=top, draws=draws,
                   seed=seed, min_expected=min_expected)
    if as_json:
        stdout.print_json(json.dumps(data))
        return
    _print(data, rows)

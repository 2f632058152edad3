"""``chexd exclusions``: the NIH pair statistics behind the reports' mutual-exclusivity rules (see daemon.cli)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from daemon.cli.console import fail
from daemon.cli.console import out as stdout

__all__ = ["exclusions"]


def exclusions(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    all_pairs: Annotated[
        bool, typer.Option("--all", help="All 91 pairs, lowest lift first (default: the exclusive pairs only).")
    ] = False,
    max_lift_upper: Annotated[
        float, typer.Option("--max-lift-upper", help="A pair is exclusive when its lift CI upper bound is below this.")
    ] = 0.6,
    margin: Annotated[
        float, typer.Option("--margin", help="Confidence ratio (p/threshold) the present partner must exceed.")
    ] = 2.0,
) -> None:
    """Show finding pairs with lift P(A,B)/(P(A)P(B)) and its 95% CI, Jaccard and image counts (NIH ChestX-ray14)."""
    from reporting.exclusions import ExclusionRules, load_pair_statistics

    try:
        rules = ExclusionRules(max_lift_upper=max_lift_upper, margin=margin, table=load_pair_statistics())
    except ValueError as exc:
        fail(str(exc), 2)
    except RuntimeError as exc:
        fail(str(exc))
    pairs = sorted(rules.table.pairs, key=lambda p: p.lift) if all_pairs else list(rules.exclusive_pairs())
    if as_json:
        data = {
            "rule": {"max_lift_upper": rules.max_lift_upper, "margin": rules.margin},
            "n_images": rules.table.n_images,
            "provenance": dict(rules.table.provenance),
            "pairs": [
                {
                    "a": p.a, "b": p.b, "lift": p.lift, "lift_ci": [p.lift_low, p.lift_high], "ci_method": p.ci_method,
                    "jaccard": p.jaccard, "n_a": p.n_a, "n_b": p.n_b, "n_ab": p.n_ab, "expected_ab": p.expected_ab,
                    "exclusive": rules.is_exclusive(p),
                }
                for p in pairs
            ],
        }
        stdout.print_json(json.dumps(data))
        return
    prov = rules.table.provenance
    title = (
        f"{'All finding pairs' if all_pairs else 'Exclusive pairs'} - NIH ChestX-ray14, {rules.table.n_images:,} "
        f"images; exclusive when lift CI upper < {rules.max_lift_upper:g}, applied when the partner is "
        f">= {rules.margin:g}x as confident"
    )
    caption = (f"{prov.get('source_file')} sha256 {str(prov.get('source_sha256'))[:12]}, derived "
               f"{prov.get('derived_on')} by {prov.get('script')}")
    table = Table(box=box.SIMPLE_HEAD, title=title, caption=caption)
    for name, justify in (("Finding A", "left"), ("Finding B", "left"), ("Lift", "right"), ("95% CI", "right"),
                          ("Jaccard", "right"), ("n A", "right"), ("n B", "right"), ("Both", "right"),
                          ("Expected", "right"), ("Excl.", "center")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for p in pairs:
        table.add_row(
            p.a, p.b, f"{p.lift:.2f}", f"{p.lift_low:.2f}-{p.lift_high:.2f}", f"{p.jaccard:.4f}", f"{p.n_a:,}",
            f"{p.n_b:,}", f"{p.n_ab:,}", f"{p.expected_ab:.0f}", "yes" if rules.is_exclusive(p) else "",
        )
    # piped or narrow output would truncate finding names and numbers: render at a width that fits the table
    console = stdout if stdout.is_terminal and stdout.width >= 120 else Console(width=120, highlight=False)
    console.print(table)

"""Mutual-exclusivity rules: the shipped NIH table, the rule, its application to one image, `chexd exclusions`."""

from __future__ import annotations

import csv
import gzip
import hashlib
import itertools
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from daemon.cli.exclusions import exclusions
from model.types import LABELS
from reporting.exclusions import ExclusionRules, apply_exclusions, load_pair_statistics

NIH = Path(__file__).resolve().parents[3] / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"
THRESHOLDS = dict.fromkeys(LABELS, 0.5)


def test_the_shipped_table_covers_all_pairs_with_provenance() -> None:
    table = load_pair_statistics()
    assert len(table.pairs) == 91
    assert {frozenset((p.a, p.b)) for p in table.pairs} == {frozenset(c) for c in itertools.combinations(LABELS, 2)}
    prov = table.provenance
    assert prov["source_file"] == NIH.name
    assert prov["source_sha256"] == hashlib.sha256(NIH.read_bytes()).hexdigest()
    assert prov["rows"] == table.n_images == 112120
    assert prov["script"] == "bench/derive_exclusions.py"
    for p in table.pairs:
        assert p.lift_low <= p.lift <= p.lift_high
        assert p.lift == pytest.approx(p.n_ab / (p.n_a * p.n_b / table.n_images), rel=1e-3)
        assert p.jaccard == pytest.approx(p.n_ab / (p.n_a + p.n_b - p.n_ab), abs=1e-5)


def test_counts_match_the_nih_label_file() -> None:
    with gzip.open(NIH, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    sets = [set(r["Finding Labels"].split("|")) for r in rows]
    table = load_pair_statistics()
    for a, b in (("Edema", "Fibrosis"), ("Effusion", "Infiltration"), ("Cardiomegaly", "Pneumothorax")):
        p = table.pair(a, b)
        assert p.n_ab == sum(1 for s in sets if a in s and b in s)
        assert {p.n_a, p.n_b} == {sum(1 for s in sets if a in s), sum(1 for s in sets if b in s)}


def test_the_design_pairs_are_negatively_associated_and_exclusive() -> None:
    rules = ExclusionRules()
    table = rules.table
    # DESIGN.md: Edema-Fibrosis 0.26, Pneumothorax-Edema 0.30, Cardiomegaly-Pneumothorax 0.37
    for (a, b), lift in ((("Edema", "Fibrosis"), 0.26), (("Pneumothorax", "Edema"), 0.30),
                         (("Cardiomegaly", "Pneumothorax"), 0.37)):
        p = table.pair(a, b)
        assert p.lift == pytest.approx(lift, abs=0.01)
        assert rules.is_exclusive(p)
    exclusive = {frozenset((p.a, p.b)) for p in rules.exclusive_pairs()}
    assert len(exclusive) == 3
    # most pairs co-occur more than chance, and low Jaccard alone is not exclusivity
    assert sum(p.lift > 1 for p in table.pairs) > 60
    assert sum(p.jaccard < 0.1 for p in table.pairs) > 80
    # a looser rule admits more pairs; a stricter one fewer
    assert len(ExclusionRules(max_lift_upper=0.9).exclusive_pairs()) > 3
    assert len(ExclusionRules(max_lift_upper=0.45).exclusive_pairs()) < 3


def test_a_much_more_confident_partner_excludes_a_finding() -> None:
    rules = ExclusionRules(margin=2.0)
    probs = dict.fromkeys(LABELS, 0.05) | {"Pneumothorax": 0.95, "Cardiomegaly": 0.6, "Edema": 0.55}
    thresholds = THRESHOLDS | {"Pneumothorax": 0.4, "Cardiomegaly": 0.5, "Edema": 0.5}
    excluded = apply_exclusions(probs, thresholds, rules)
    # Pneumothorax confidence 0.95/0.4 = 2.4; Cardiomegaly 1.2 (ratio 1.98 < 2): kept; Edema 1.1 (ratio 2.16): out
    assert set(excluded) == {"Edema"}
    reason = excluded["Edema"].reason
    assert "Pneumothorax" in reason and "0.95" in reason and "0.30" in reason
    # a lower margin excludes Cardiomegaly too; a higher one nothing
    assert set(apply_exclusions(probs, thresholds, ExclusionRules(margin=1.5))) == {"Edema", "Cardiomegaly"}
    assert apply_exclusions(probs, thresholds, ExclusionRules(margin=3.0)) == {}


def test_exclusion_needs_the_partner_present_and_an_exclusive_pair() -> None:
    rules = ExclusionRules()
    # Edema absent (below threshold): Fibrosis stays
    assert apply_exclusions({"Edema": 0.49, "Fibrosis": 0.51}, THRESHOLDS, rules) == {}
    # Effusion-Infiltration co-occur above chance: never exclusive, whatever the confidence
    assert apply_exclusions({"Effusion": 0.99, "Infiltration": 0.11}, THRESHOLDS | {"Infiltration": 0.1}, rules) == {}
    # below-threshold findings are never excluded
    assert apply_exclusions({"Edema": 0.99, "Fibrosis": 0.2}, THRESHOLDS, rules) == {}


def test_an_excluded_finding_does_not_exclude_others() -> None:
    # Pneumothorax excludes Edema; Edema (excluded) must not then exclude Fibrosis
    probs = {"Pneumothorax": 0.99, "Edema": 0.52, "Fibrosis": 0.1}
    thresholds = {"Pneumothorax": 0.2, "Edema": 0.5, "Fibrosis": 0.09}
    excluded = apply_exclusions(probs, thresholds, ExclusionRules())
    assert set(excluded) == {"Edema"}
    # label order does not matter
    assert set(apply_exclusions(dict(reversed(list(probs.items()))), thresholds, ExclusionRules())) == {"Edema"}


def test_invalid_rules_and_thresholds_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_lift_upper"):
        ExclusionRules(max_lift_upper=0.0)
    with pytest.raises(ValueError, match="margin"):
        ExclusionRules(margin=0.5)
    with pytest.raises(ValueError, match="No threshold for 'Edema'"):
        apply_exclusions({"Edema": 0.9}, {}, ExclusionRules())
    with pytest.raises(ValueError, match="Invalid threshold for 'Edema'"):
        apply_exclusions({"Edema": 0.9}, {"Edema": 1.2}, ExclusionRules())


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(exclusions)
    return app


def test_cli_prints_the_exclusive_pairs_and_all_pairs_as_json() -> None:
    runner = CliRunner()
    result = runner.invoke(_app(), [])
    assert result.exit_code == 0, result.output
    for name in ("Edema", "Fibrosis", "Pneumothorax", "Cardiomegaly", "0.26", "0.30", "0.37", "Jaccard"):
        assert name in result.output
    assert "Hernia" not in result.output
    result = runner.invoke(_app(), ["--json", "--all"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["pairs"]) == 91
    assert sum(p["exclusive"] for p in data["pairs"]) == 3
    assert data["provenance"]["source_file"] == NIH.name
    lifts = [p["lift"] for p in data["pairs"]]
    assert lifts == sorted(lifts)
    result = runner.invoke(_app(), ["--max-lift-upper", "2"])
    assert result.exit_code == 2
    assert "max_lift_upper" in result.output

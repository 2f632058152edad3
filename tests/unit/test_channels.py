"""model.channels: polarization score, top-N rule, label pair statistics, base rate and row-permutation null."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.channels import (
    ChannelAnalysisError,
    analyse_channels,
    label_pairs,
    polarization,
    top_polarized,
)
from model.types import LABELS

K = len(LABELS)
NIH_LABELS = Path(__file__).parents[2].parent / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"
EXCLUSIVE = ((0, 1), (2, 3), (4, 5))  # planted mutually exclusive finding pairs of the synthetic labels


def synthetic_labels(n: int = 4000, prevalence: float = 0.15, seed: int = 0) -> np.ndarray:
    """Independent findings, except the EXCLUSIVE pairs, which never co-occur (lift 0). Independent pairs at this
    prevalence have Jaccard ~0.08 < 0.1: the base-rate trap in miniature."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, K)) < prevalence).astype(np.uint8)
    for a, b in EXCLUSIVE:
        labels[labels[:, a] == 1, b] = 0
    return labels


def noise_weight(channels: int = 256, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.01, (K, channels))


def plant(weight: np.ndarray, channel: int, pos: int, neg: int, up: float, down: float) -> None:
    weight[:, channel] = np.random.default_rng(channel).normal(0.0, 0.01, K)
    weight[pos, channel], weight[neg, channel] = up, -down


HAND = np.array(
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
    dtype=np.uint8,
)  # 8 images; n = (4, 3, 2, 0); n01 = 2, n02 = 1, n12 = 0


def test_pair_statistics_match_a_hand_computation() -> None:
    pairs = label_pairs(HAND, names=("A", "B", "C", "D"), source="hand")
    assert pairs.n_images == 8 and pairs.positives.tolist() == [4, 3, 2, 0]
    assert pairs.counts[0, 1] == 2 and pairs.counts[0, 2] == 1 and pairs.counts[1, 2] == 0
    assert pairs.jaccard[0, 1] == pytest.approx(2 / 5) and pairs.lift[0, 1] == pytest.approx(2 * 8 / (4 * 3))
    assert pairs.jaccard[0, 2] == pytest.approx(1 / 5) and pairs.lift[0, 2] == pytest.approx(1.0)
    assert pairs.jaccard[1, 2] == 0.0 and pairs.lift[1, 2] == 0.0
    assert pairs.expected[0, 1] == pytest.approx(1.5)
    # D has no positive: Jaccard with A is 0 of 4, its lift is undefined
    assert pairs.jaccard[0, 3] == 0.0 and np.isnan(pairs.lift[0, 3]) and np.isnan(pairs.jaccard[0, 0])
    assert np.allclose(pairs.jaccard, pairs.jaccard.T, equal_nan=True)
    row = pairs.pair(0, 1)
    assert row == {
        "a": "A",
        "b": "B",
        "n_a": 4,
        "n_b": 3,
        "n_ab": 2,
        "expected_ab": 1.5,
        "jaccard": 0.4,
        "lift": pytest.approx(4 / 3),
    }
    assert len(pairs.to_dict()["pairs"]) == 6 and pairs.to_dict()["pairs"][2]["lift"] is None


def test_pair_statistics_reproduce_the_shipped_nih_table() -> None:
    from model.datasets import read_label_csv

    shipped = json.loads((Path(__file__).parents[2] / "reporting" / "data" / "exclusions.json").read_text())
    pairs = label_pairs(read_label_csv(NIH_LABELS).labels, source="nih")
    assert pairs.n_images == shipped["n_images"] == 112120
    for row in shipped["pairs"]:
        a, b = LABELS.index(row["a"]), LABELS.index(row["b"])
        assert (pairs.counts[a, a], pairs.counts[b, b], pairs.counts[a, b]) == (row["n_a"], row["n_b"], row["n_ab"])
        assert pairs.lift[a, b] == pytest.approx(row["lift"], abs=1e-4)
        assert pairs.jaccard[a, b] == pytest.approx(row["jaccard"], abs=1e-5)
    j = pairs.jaccard[np.triu_indices(K, 1)]
    assert (j < 0.1).sum() == 86  # the base rate DESIGN.md quotes


def test_planted_polarized_channels_are_found_in_score_order() -> None:
    w = noise_weight()
    plant(w, 10, pos=2, neg=5, up=0.5, down=0.45)  # score 0.45
    plant(w, 3, pos=0, neg=7, up=0.3, down=0.6)  # score 0.30: the weaker end counts
    plant(w, 40, pos=9, neg=1, up=0.2, down=0.25)  # score 0.20
    w[:, 77] = np.abs(w[:, 77])
    w[4, 77] = 2.0  # a one-sided detector: huge positive, no negative weight -> score <= 0
    w[:, 78] = -0.005
    w[6, 78] = 1.0  # huge positive, tiny negative -> score 0.005: not polarized
    score, pos, neg = polarization(w)
    assert score[10] == pytest.approx(0.45) and (pos[10], neg[10]) == (2, 5)
    assert score[77] <= 0 and score[78] == pytest.approx(0.005)
    assert top_polarized(w, 3).tolist() == [10, 3, 40]
    result = analyse_channels(w, label_pairs(synthetic_labels()), top=3, draws=50)
    assert [(c.channel, c.positive, c.negative) for c in result.channels] == [
        (10, LABELS[2], LABELS[5]),
        (3, LABELS[0], LABELS[7]),
        (40, LABELS[9], LABELS[1]),
    ]
    assert result.channels[1].positive_weight == pytest.approx(0.3)
    assert result.channels[1].negative_weight == pytest.approx(-0.6)
    assert result.eligible < w.shape[1] and 77 not in top_polarized(w, 256).tolist()


def test_null_p_value_is_small_for_planted_exclusive_pairs_and_jaccard_alone_cannot_tell() -> None:
    w = noise_weight()
    for i in range(30):
        a, b = EXCLUSIVE[i % 3]
        plant(w, 100 + i, pos=a, neg=b, up=0.5 + 0.01 * i, down=0.5 + 0.01 * i)
    result = analyse_channels(w, label_pairs(synthetic_labels()), top=30, draws=2000, seed=3)
    assert {(c.positive, c.negative) for c in result.channels} == {(LABELS[a], LABELS[b]) for a, b in EXCLUSIVE}
    assert result.observed.mean_lift == 0.0 and result.observed.distinct_pairs == 3
    assert result.null.mean_lift_mean > 0.8 and result.null.p_lift < 0.01 and result.verdict == "supported"
    # every pair of these labels has Jaccard < 0.1: the paper's statistic is 100% for any channels at all
    assert result.observed.share_jaccard_below == 1.0 and result.base_rate.share_jaccard_below > 0.9
    assert result.null.p_jaccard > 0.5
    assert result.null.draws_used == 2000 and result.null.p_lift >= 1 / 2001


def test_null_p_value_is_large_when_polarized_pairs_are_random() -> None:
    rng = np.random.default_rng(7)
    w = noise_weight()
    for i in range(30):
        a, b = rng.choice(K, size=2, replace=False)
        plant(w, 100 + i, pos=int(a), neg=int(b), up=0.5, down=0.5 + 0.01 * i)
    result = analyse_channels(w, label_pairs(synthetic_labels()), top=30, draws=2000, seed=3)
    assert result.observed.distinct_pairs >= 20
    assert result.null.p_lift > 0.1 and result.verdict == "not supported"


def test_permutation_null_matches_the_exact_distribution_on_three_findings() -> None:
    """One channel, three findings: a uniform row permutation maps its pair to each of the 3 pairs with
    probability 1/3, so p = P(null lift <= observed) is 1/3 for the lowest-lift pair and 1 for the highest."""
    pairs = label_pairs(HAND[:, :3], names=("A", "B", "C"))  # lifts: AB 1.33, AC 1.0, BC 0
    w = np.array([[0.0], [1.0], [-1.0]])  # B+, C-: the lowest-lift pair
    low = analyse_channels(w, pairs, top=1, draws=3000, seed=0, min_expected=0.0)
    assert low.observed.mean_lift == 0.0 and low.null.p_lift == pytest.approx(1 / 3, abs=0.04)
    high = analyse_channels(np.array([[1.0], [-1.0], [0.0]]), pairs, top=1, draws=3000, seed=0, min_expected=0.0)
    assert high.null.p_lift == 1.0


def test_pairs_with_few_expected_co_occurrences_are_shown_but_not_counted() -> None:
    pairs = label_pairs(HAND[:, :3], names=("A", "B", "C"))  # expected BC = 3 * 2 / 8 = 0.75 images
    result = analyse_channels(np.array([[0.0], [1.0], [-1.0]]), pairs, top=1, draws=20, min_expected=1.0)
    (channel,) = result.channels
    assert channel.lift == 0.0 and channel.lift_counted is False and channel.expected_both == pytest.approx(0.75)
    assert result.observed.mean_lift is None and result.null.p_lift is None and result.verdict == "undefined"
    assert result.base_rate.lift_defined == 2  # AB (1.5 expected) and AC (1.0)


def test_result_is_json_ready_and_states_its_null() -> None:
    w = noise_weight(64)
    result = analyse_channels(w, label_pairs(synthetic_labels(500), source="synthetic"), top=10, draws=100, seed=5)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["label_source"] == "synthetic" and data["n_images"] == 500 and len(data["channels"]) == 10
    assert data["null"]["method"] == "row-permutation" and data["null"]["draws"] == 100 and data["null"]["seed"] == 5
    assert {"p_lift", "p_jaccard", "share_interval", "mean_lift_interval"} <= set(data["null"])
    assert data["base_rate"]["pairs"] == 91 and "Jaccard < 0.1 in" in data["summary"]
    assert analyse_channels(w, label_pairs(synthetic_labels(500)), top=10, draws=100, seed=5).null == result.null


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda p: analyse_channels(np.zeros((3, 4)), p), "3 rows but 14 findings"),
        (lambda p: analyse_channels(noise_weight(8), p, top=0), "Invalid top 0"),
        (lambda p: analyse_channels(noise_weight(8), p, draws=0), "Invalid draws 0"),
        (lambda p: analyse_channels(noise_weight(8), p, jaccard_cut=0.0), "Invalid jaccard_cut 0.0"),
        (lambda p: analyse_channels(np.abs(noise_weight(8)), p), "no channel has both"),
        (lambda p: analyse_channels(np.full((K, 2), np.nan), p), "NaN"),
        (lambda p: label_pairs(np.full((3, K), 2)), "must be 0 or 1"),
        (lambda p: label_pairs(np.zeros((3, 5))), "expected [images >= 1, 14]"),
    ],
)
def test_bad_input_is_refused_with_the_parameter_named(call, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ChannelAnalysisError, match=None) as info:
        call(label_pairs(synthetic_labels(200)))
    assert words in str(info.value)

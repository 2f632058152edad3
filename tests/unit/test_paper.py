"""paper-table rows: verdict rules on synthetic inputs, and the measurements on tiny synthetic FeatureSets."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from model.features import FeatureSet
from model.paper import (
    DEMO,
    REAL,
    STRUCTURAL,
    VERDICTS,
    CorrectionStudy,
    FinetuneStudy,
    PaperError,
    PaperRow,
    calibration_rows,
    compression_auroc_row,
    compression_params_row,
    correction_rows,
    finetune_rows,
    head_parameters_row,
    latency_row,
    measure_correction,
    measure_finetune,
    polarized_row,
    ratio_verdict,
    routing_row,
)
from model.types import LABELS
from tests.nets import one_thread


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def _row(**overrides: object) -> PaperRow:
    fields = {
        "section": "s",
        "claim": "c",
        "value": 1.0,
        "ci": None,
        "paper_value": 1.0,
        "data": DEMO,
        "verdict": "reproduced",
        "reason": "because",
    } | overrides
    return PaperRow(**fields)  # type: ignore[arg-type]


def test_a_structural_claim_is_never_reproduced() -> None:
    with pytest.raises(PaperError, match="structural claim is never 'reproduced'"):
        _row(data=STRUCTURAL)
    assert _row(data=STRUCTURAL, verdict="true by construction").verdict == "true by construction"


@pytest.mark.parametrize(
    "bad", [{"verdict": "sort of"}, {"data": "vibes"}, {"reason": " "}, {"ci": (0.2, 0.1)}, {"ci": (float("nan"), 1.0)}]
)
def test_a_row_rejects_what_it_cannot_stand_for(bad: dict[str, object]) -> None:
    with pytest.raises(PaperError):
        _row(**bad)


def test_row_json_has_the_keys_of_the_table() -> None:
    data = _row(ci=(0.5, 1.5)).to_dict()
    assert {"claim", "value", "ci", "paper_value", "data", "verdict", "reason"} <= set(data)
    assert data["ci"] == [0.5, 1.5]


def test_ratio_verdict_rules() -> None:
    assert ratio_verdict(1.7, (1.55, 1.9), 1.6)[0] == "reproduced"  # CI holds the paper's value
    assert ratio_verdict(1.8, (1.75, 1.85), 1.6)[0] == "reproduced"  # within 15%
    assert ratio_verdict(1.26, (1.19, 1.39), 1.6)[0] == "not reproduced"  # 21% off, CI misses it
    verdict, reason = ratio_verdict(3.0, (2.8, 3.3), 1.6)
    assert verdict == "not reproduced" and "1.88x" in reason
    assert ratio_verdict(None, None, 7.0)[0] == "not measurable here"


def test_parameter_counts_are_structural() -> None:
    row = compression_params_row(6_968_206, 2_464_006)
    assert row.data == STRUCTURAL and row.verdict == "true by construction"
    assert row.value == pytest.approx(0.646393, abs=1e-6)
    assert compression_params_row(6_968_206, 6_000_000).verdict == "not reproduced"
    with pytest.raises(PaperError):
        compression_params_row(100, 200)


def test_head_parameters_of_densenet121_do_not_match_18k() -> None:
    row = head_parameters_row(14, 1024)
    assert row.value == 14_350 and row.verdict == "not reproduced" and "14 x 1024 + 14" in row.reason
    assert head_parameters_row(14, 1285).verdict == "true by construction"


def test_compression_auroc_follows_the_honest_verdict() -> None:
    delta = {"mean_delta": -0.0003, "resampled": "patients"}
    judged = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia"]
    met = {"verdict": "met", "mean_delta": -0.0002, "mean_delta_ci": [-0.001, 0.0008], "reason": "ok", "judged": judged}
    assert compression_auroc_row(delta, met, source="x").verdict == "reproduced"
    failed = met | {"verdict": "not met", "reason": "Mass CI below the floor"}
    row = compression_auroc_row(delta, failed, source="x")
    assert row.verdict == "not reproduced" and "Mass" in row.reason
    assert (
        compression_auroc_row(delta, {"mean_delta": None, "reason": "few"}, source="x").verdict == "not measurable here"
    )
    few = compression_auroc_row(delta, met | {"judged": judged[:2]}, source="x")  # 'met', but on 2 findings only
    assert few.verdict == "not measurable here" and "only 2 of 14 findings" in few.reason


def test_cpu_latency_is_not_the_papers_gpu_figure() -> None:
    row = latency_row([30, 31, 29, 30], [20, 21, 20, 22], device="cpu", threads=2, input_size=128)
    assert row.verdict == "not measurable here" and "GPU" in row.reason and "CPU" in row.reason
    assert row.value == pytest.approx(1.5, abs=0.05)
    gpu = latency_row([15.0] * 5, [14.0] * 5, device="cuda", threads=1, input_size=224)
    assert gpu.verdict == "reproduced"
    with pytest.raises(PaperError):
        latency_row([1.0], [], device="cpu", threads=1, input_size=128)


def _check(
    lost: int,
    tps: int = 40,
    verdict: str = "passed",
    delta_p: float | None = -0.2,
    ci: tuple[float, float] | None = (-0.3, -0.1),
) -> dict[str, object]:
    return {
        "finding": "Effusion",
        "true_positives": tps,
        "true_positives_lost": lost,
        "tp_loss_ci": [0.0, 0.01],
        "pattern_examples": 12,
        "pattern_corrected": 5,
        "pattern_delta_p": delta_p,
        "pattern_delta_p_ci": ci,
        "verdict": verdict,
    }


def _study(*checks: dict[str, object], refused: int = 0) -> CorrectionStudy:
    accepted = tuple(
        {"finding": "Effusion", "target": f"t{i}", "channels": [1, 2], "held_out": c, "other_max_abs_logit_change": 0.0}
        for i, c in enumerate(checks)
    )
    return CorrectionStudy(
        tried=len(checks) + refused,
        available=20,
        accepted=accepted,
        refused=tuple({"finding": "Mass", "target": "x", "reason": "needs 30 channels"} for _ in range(refused)),
        tolerance=0.02,
        source="phantom",
    )


def test_correction_rows_verdicts() -> None:
    rows = {r.claim: r for r in correction_rows(_study(_check(0), refused=3))}
    assert len(rows) == 4
    assert rows["5 channels zeroed"].verdict == "true by construction"  # the search is capped at 5
    assert rows["zero TP loss (held out)"].verdict == "reproduced"
    assert rows["Δprob -0.13 on the pattern"].verdict == "reproduced"
    other = rows["zero AUROC change on the other 13 findings"]
    assert other.verdict == "true by construction" and other.data == STRUCTURAL

    rows = {
        r.claim: r
        for r in correction_rows(_study(_check(0), _check(2, verdict="tp_loss", delta_p=-0.01, ci=(-0.02, 0.01))))
    }
    assert rows["zero TP loss (held out)"].verdict == "not reproduced" and rows["zero TP loss (held out)"].value == 2
    too_few = {r.claim: r for r in correction_rows(_study(_check(0, tps=3, verdict="too_few_positives")))}
    assert too_few["zero TP loss (held out)"].verdict == "not measurable here"
    weak = {r.claim: r for r in correction_rows(_study(_check(0, delta_p=-0.05, ci=(-0.08, -0.02))))}
    assert weak["Δprob -0.13 on the pattern"].verdict == "not reproduced"  # lower, but not by the paper's 0.13
    refused = correction_rows(_study(refused=4))
    assert [r.verdict for r in refused[:3]] == ["not reproduced"] * 3 and "30 channels" in refused[0].reason
    assert refused[3].verdict == "true by construction"


def test_calibration_rows_need_real_predictions() -> None:
    missing = calibration_rows(None)
    assert [r.verdict for r in missing] == ["not measurable here"] * 2 and "--chexnet-preds" in missing[0].reason
    result = {
        "f1_ratio": 1.8,
        "f1_ratio_ci": [1.7, 1.9],
        "recall_ratio": 2.0,
        "recall_ratio_ci": [1.9, 2.1],
        "n_splits": 3,
    }
    f1, recall = calibration_rows(result, source="preds.csv")
    assert f1.data == REAL and f1.verdict == "reproduced" and recall.verdict == "not reproduced"
    assert "3 split(s)" in f1.reason


def test_routing_and_polarized_rows() -> None:
    assert routing_row(None, source="x", reason="no model").verdict == "not measurable here"
    row = routing_row({"threshold": 3, "channel edit": 1, "needs data": 5}, source="phantom")
    assert row.verdict == "true by construction" and "threshold: 3" in str(row.value)
    assert polarized_row(None, source="x").verdict == "not measurable here"

    def analysis(p_lift: float | None) -> dict[str, object]:
        return {
            "observed": {
                "share_jaccard_below": 0.9,
                "jaccard_below": 90,
                "channels": 100,
                "distinct_pairs": 12,
                "mean_lift": 0.8,
            },
            "base_rate": {"share_jaccard_below": 0.93, "pairs": 91},
            "null": {"share_mean": 0.92, "p_jaccard": 0.7, "p_lift": p_lift, "mean_lift_mean": 0.85, "draws_used": 99},
        }

    base_rate = polarized_row(analysis(0.71), source="x")
    assert base_rate.verdict == "not reproduced"  # a high share that the null matches is no evidence
    assert "base rate over all 91 finding pairs 93%" in base_rate.reason
    assert polarized_row(analysis(0.001), source="x").verdict == "reproduced"
    assert polarized_row(analysis(None), source="x").verdict == "not measurable here"


def _finetune(delta: float | None, best_ci: tuple[float, float] | None, best_epoch: int = 5) -> FinetuneStudy:
    per = ({"label": "Edema", "auroc_delta": -0.01, "auroc_delta_ci": best_ci},)
    return FinetuneStudy(
        seconds=1.5,
        train_images=100,
        stop_images=50,
        verification_images=150,
        epochs=12,
        best_epoch=best_epoch,
        mean_f1_delta=delta,
        mean_f1_delta_ci=(-0.01, 0.02) if delta is not None else None,
        eligible=("Edema",),
        best=("Edema",) if best_ci else (),
        per_finding=per,
        source="phantom",
    )


def test_finetune_rows_verdicts() -> None:
    seconds, marginal, regress = finetune_rows(_finetune(0.01, (-0.02, -0.001)))
    assert seconds.verdict == "not measurable here" and seconds.value == 1.5
    assert marginal.verdict == "reproduced" and regress.verdict == "reproduced" and regress.value == 1
    _, big, kept = finetune_rows(_finetune(0.08, (-0.02, 0.01)))
    assert big.verdict == "not reproduced" and kept.verdict == "not reproduced"
    _, kept_original, _ = finetune_rows(_finetune(0.0, (-0.01, 0.01), best_epoch=0))
    assert kept_original.verdict == "not measurable here" and "kept the original head" in kept_original.reason
    _, none, no_best = finetune_rows(_finetune(None, None))
    assert none.verdict == "not measurable here" and no_best.verdict == "not measurable here"


# ------------------------------------------------------------------ measurements on tiny synthetic FeatureSets


def _features(n: int = 400, channels: int = 24, seed: int = 0) -> tuple[FeatureSet, np.ndarray, np.ndarray]:
    """Features whose labels follow a known head (noisy), 2 images per patient."""
    rng = np.random.default_rng(seed)
    weight = (rng.normal(0, 1.0, (14, channels)) * (rng.random((14, channels)) < 0.4)).astype(np.float32)
    bias = np.full(14, -1.5, np.float32)
    pooled = rng.gamma(2.0, 0.5, (n, channels)).astype(np.float32)
    p = 1 / (1 + np.exp(-(pooled @ weight.T + bias)))
    labels = (rng.random(p.shape) < p).astype(np.uint8)
    fs = FeatureSet(
        ids=[f"i{i}" for i in range(n)],
        patients=[f"p{i // 2}" for i in range(n)],
        pooled=pooled,
        labels=labels,
        source="synthetic",
    )
    return fs, weight, bias


def test_measure_correction_plans_on_selection_and_checks_held_out() -> None:
    fs, weight, bias = _features()
    thresholds = {name: 0.5 for name in LABELS}
    study = measure_correction(weight, bias, thresholds, fs, max_attempts=4, n_bootstrap=50)
    assert study.tried == 4 and study.available >= 4
    assert len(study.accepted) + len(study.refused) == 4
    held_out_ids = {f"i{i}" for i in range(400)}
    for a in study.accepted:
        assert a["target"] in held_out_ids and a["held_out"]["verdict"] in ("passed", "tp_loss", "too_few_positives")
        assert a["other_max_abs_logit_change"] == 0.0
        assert a["held_out"]["images"] < 400  # the verification part only
    rows = correction_rows(study)
    assert len(rows) == 4 and all(r.verdict in VERDICTS for r in rows)


def test_measure_finetune_reports_on_the_verification_part() -> None:
    fs, weight, bias = _features(n=600, seed=1)
    rng = np.random.default_rng(2)
    start = (weight + rng.normal(0, 0.5, weight.shape)).astype(np.float32)
    study = measure_finetune(start, bias, fs, n_bootstrap=50, max_epochs=30)
    assert study.verification_images + study.train_images + study.stop_images == 600
    assert study.seconds > 0 and study.epochs >= 1
    assert len(study.per_finding) == 14 and set(study.best) <= set(study.eligible)
    if study.eligible:
        assert study.mean_f1_delta is not None
    assert len(finetune_rows(study)) == 3

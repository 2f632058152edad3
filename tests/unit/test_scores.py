"""Predictions CSV joined with a labels CSV: the real CheXNet file, header variants, and the errors people hit."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from model.datasets import DatasetError, LabelledSource
from model.network import Architecture, DenseNet
from model.scores import read_scored_csv, score_source
from model.types import LABELS, PreprocessRecipe

DATA = Path(__file__).parents[2].parent / "shared" / "data"


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as fh:  # type: ignore[operator]
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _predictions(path: Path, ids: list[str], scores: np.ndarray, prefix: str = "prob_") -> Path:
    return _write(path, ["Image Index", *(prefix + label for label in LABELS)],
                  [[i, *row] for i, row in zip(ids, scores.tolist(), strict=True)])


def test_real_chexnet_predictions_join_the_nih_label_file() -> None:
    scored = read_scored_csv(DATA / "chexnet-preds" / "preds.csv", DATA / "nih" / "Data_Entry_2017_v2020.csv.gz")
    assert len(scored.ids) == 22433 and scored.dropped == 0
    assert scored.scores.shape == (22433, 14) and scored.labels.dtype == np.uint8
    # NIH image names start with the patient number: every joined row must carry its own patient
    assert all(int(i[:8]) == int(p) for i, p in zip(scored.ids, scored.patients, strict=True))
    with gzip.open(DATA / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        truth = {row["Image Index"]: row["Finding Labels"] for row in csv.DictReader(fh)}
    for k in (0, 1234, 22432):
        names = set(truth[scored.ids[k]].split("|")) - {"No Finding"}
        assert {LABELS[c] for c in np.flatnonzero(scored.labels[k])} == names
    with open(DATA / "chexnet-preds" / "preds.csv") as fh:
        first = next(csv.DictReader(fh))
    assert scored.ids[0] == first["Image Index"]
    assert scored.scores[0, LABELS.index("Hernia")] == float(first["prob_Hernia"])


def test_plain_label_headers_per_finding_columns_and_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = [f"img{i}.png" for i in range(6)]
    scores = rng.random((6, 14))
    y = (rng.random((6, 14)) < 0.5).astype(int)
    preds = _predictions(tmp_path / "p.csv", ids, scores, prefix="")
    labels = _write(tmp_path / "l.csv.gz", ["image_id", "patient_id", *(name.replace("_", " ") for name in LABELS)],
                    [[i, f"P{k // 2}", *row] for k, (i, row) in enumerate(zip(ids, y.tolist(), strict=True))])
    scored = read_scored_csv(preds, labels)
    np.testing.assert_array_equal(scored.labels, y)
    np.testing.assert_allclose(scored.scores, scores)
    assert scored.patients == ("P0", "P0", "P1", "P1", "P2", "P2")


def test_rows_without_labels_are_counted_and_no_join_is_an_error(tmp_path: Path) -> None:
    labels = _write(tmp_path / "l.csv", ["Image Index", "Finding Labels", "Patient ID"],
                    [["a.png", "Effusion|Mass", "1"], ["b.png", "No Finding", "2"]])
    preds = _predictions(tmp_path / "p.csv", ["a.png", "b.png", "x.png"], np.full((3, 14), 0.2))
    scored = read_scored_csv(preds, labels)
    assert scored.ids == ("a.png", "b.png") and scored.dropped == 1 and scored.dropped_examples == ("x.png",)
    assert scored.labels[0, LABELS.index("Effusion")] == 1 and scored.labels[1].sum() == 0
    none = _predictions(tmp_path / "none.csv", ["y.png", "z.png"], np.full((2, 14), 0.2))
    with pytest.raises(DatasetError, match="none of its 2 ids"):
        read_scored_csv(none, labels)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_column", "probability column"),
        ("logits", "not probabilities"),
        ("text", "not a number"),
        ("unknown_finding", "unknown finding name"),
        ("uncertain", "must be 0 or 1"),
        ("no_id", "no image id column"),
    ],
)
def test_bad_files_fail_with_a_message_naming_the_problem(tmp_path: Path, case: str, message: str) -> None:
    ids = ["a.png", "b.png"]
    scores = np.full((2, 14), 0.3)
    labels = _write(tmp_path / "l.csv", ["Image Index", "Finding Labels"], [["a.png", "Mass"], ["b.png", "Hernia"]])
    preds = tmp_path / "p.csv"
    if case == "missing_column":
        _write(preds, ["Image Index", *(f"prob_{x}" for x in LABELS[:-1])], [[i, *[0.3] * 13] for i in ids])
    elif case == "logits":
        _predictions(preds, ids, scores * 10)
    elif case == "text":
        _write(preds, ["Image Index", *(f"prob_{x}" for x in LABELS)], [["a.png", "high", *[0.1] * 13]])
    else:
        _predictions(preds, ids, scores)
    if case == "unknown_finding":
        _write(labels, ["Image Index", "Finding Labels"], [["a.png", "Mass|Tuberculosis"], ["b.png", "No Finding"]])
    elif case == "uncertain":
        _write(labels, ["Image Index", *LABELS], [["a.png", -1, *[0] * 13], ["b.png", *[0] * 14]])
    elif case == "no_id":
        _write(labels, ["name", "Finding Labels"], [["a.png", "Mass"]])
    with pytest.raises(DatasetError, match=message):
        read_scored_csv(preds, labels)


class _Noise(LabelledSource):
    def __init__(self, n: int) -> None:
        self.ids = tuple(f"i{k}" for k in range(n))
        self.patients = (None,) * n
        self.labels = np.zeros((n, 14), np.uint8)
        self.description = "test images"

    def load(self, i: int) -> np.ndarray:
        image = np.random.default_rng(i).random((64, 64)).astype(np.float32)
        return image


def test_score_source_batches_and_reorders_outputs_to_the_label_order() -> None:
    torch.manual_seed(0)
    model = DenseNet(Architecture.tiny())
    recipe = PreprocessRecipe(input_size=64, resize=None)
    source = _Noise(5)
    plain = score_source(model, source, recipe=recipe, device="cpu", batch_size=2)
    assert plain.scores.shape == (5, 14) and plain.ids == source.ids
    reversed_labels = tuple(reversed(LABELS))  # a model whose outputs come in the opposite order
    swapped = score_source(model, source, recipe=recipe, output_labels=reversed_labels, device="cpu", batch_size=5)
    np.testing.assert_allclose(swapped.scores, plain.scores[:, ::-1], atol=1e-6)
    with pytest.raises(DatasetError, match="no output for Hernia"):
        score_source(model, source, recipe=recipe, output_labels=LABELS[:-1] + ("Other",), device="cpu")

"""The applicability (out-of-domain) model: fit, score, threshold share, JSON, version ids, the engine's hook."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.applicability import ApplicabilityError, ApplicabilityModel, fit_applicability
from model.artifact import Manifest, load_artifact, read_manifest, save_artifact
from model.engine import Engine
from model.network import Architecture
from model.train import fit_applicability_on, pooled_of
from model.types import Applicability, Prediction, PreprocessRecipe
from tests.nets import image, tiny

SMALL = PreprocessRecipe(input_size=64, resize=None)
SCALES = np.linspace(3.0, 0.1, 48)


def _gaussian(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, len(SCALES))) * SCALES + shift).astype(np.float32)


@pytest.mark.parametrize("method", ["mahalanobis-pca16", "knn5-pca16"])
def test_shifted_points_are_out_and_fresh_in_domain_points_keep_about_the_stated_share(method: str) -> None:
    model = fit_applicability(_gaussian(400, 0), method=method, in_domain_share=0.9)
    fresh = np.mean(model.score(_gaussian(2000, 1)) <= model.threshold)
    shifted = np.mean(model.score(_gaussian(200, 2, shift=4.0)) <= model.threshold)
    assert 0.85 <= fresh <= 0.96  # cross-fitted threshold: about the stated share on images it never saw
    assert shifted < 0.05
    assert model.validation_in_domain_share == pytest.approx(0.9, abs=0.01)


def test_residual_term_catches_a_shift_off_the_principal_subspace() -> None:
    fit = _gaussian(400, 0)
    model = fit_applicability(fit, method="mahalanobis-pca8")
    off = _gaussian(200, 3)
    off[:, -1] += 12.0  # the smallest-variance axis: outside the 8 kept components
    z = (off - model.mean) @ model.components.T
    subspace = ((z**2) / model.variances).sum(1)
    inside = (((fit - model.mean) @ model.components.T) ** 2 / model.variances).sum(1)
    assert np.mean(subspace > np.quantile(inside, 0.95)) < 0.2  # the subspace distance alone barely notices
    assert np.mean(model.score(off) > model.threshold) > 0.9


def test_in_sample_share_equals_the_stated_share_without_cross_fitting() -> None:
    fit = _gaussian(200, 4)
    model = fit_applicability(fit, in_domain_share=0.8, folds=1, method="mahalanobis-pca10")
    assert np.mean(model.score(fit) <= model.threshold) == pytest.approx(0.8, abs=1.01 / 200)  # one tie step


def test_json_round_trip_is_exact_and_small() -> None:
    model = fit_applicability(_gaussian(100, 5), method="knn3-pca12", source="synthetic")
    text = json.dumps(model.to_dict())
    again = ApplicabilityModel.from_dict(json.loads(text))
    probe = _gaussian(20, 6, shift=0.5)
    np.testing.assert_array_equal(again.score(probe), model.score(probe))
    assert again.to_dict() == model.to_dict() and again.source == "synthetic"
    full = fit_applicability(np.random.default_rng(0).random((100, 1024), dtype=np.float32))
    assert full.method == "mahalanobis-pca64" and len(json.dumps(full.to_dict())) < 1_000_000


def test_judge_gives_the_interface_verdict() -> None:
    model = fit_applicability(_gaussian(100, 7), method="mahalanobis-pca8")
    inside, outside = model.judge(np.zeros(len(SCALES), np.float32)), model.judge(np.full(len(SCALES), 9, np.float32))
    assert isinstance(inside, Applicability) and inside.in_domain and not outside.in_domain
    assert outside.score > outside.threshold == model.threshold and outside.method == "mahalanobis-pca8"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fit_applicability(_gaussian(9, 0)), "at least 10"),
        (lambda: fit_applicability(_gaussian(50, 0), method="pca"), "Invalid method"),
        (lambda: fit_applicability(_gaussian(50, 0), method="mahalanobis-pca65"), "1..64"),
        (lambda: fit_applicability(_gaussian(50, 0), in_domain_share=1.0), "in_domain_share"),
        (lambda: fit_applicability(np.full((50, 4), np.nan)), "NaN"),
        (lambda: fit_applicability(_gaussian(50, 0), method="mahalanobis-pca4").score(np.zeros((1, 3))), "width 3"),
        (lambda: ApplicabilityModel.from_dict({"format": "x"}), "format"),
    ],
)
def test_bad_input_is_refused_with_a_named_rule(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ApplicabilityError, match=message):
        call()


# --- the artifact ----------------------------------------------------------------------------------------------------


def _legacy_version_id(manifest: Manifest) -> str:
    """The version id formula before the applicability field existed."""
    key = json.dumps(
        {
            "weights_sha256": manifest.weights_sha256,
            "labels": list(manifest.labels),
            "thresholds": {k: round(v, 9) for k, v in manifest.thresholds.items()},
            "preprocessing": manifest.preprocessing.to_dict(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tiny_fit() -> tuple[torch.nn.Module, ApplicabilityModel]:
    network = tiny()
    return network, fit_applicability_on(network, image(batch=24, seed=3), source="random inputs")


def test_version_id_changes_with_the_applicability_model_and_not_for_artifacts_without_one(
    tmp_path: Path, tiny_fit: tuple[torch.nn.Module, ApplicabilityModel]
) -> None:
    network, model = tiny_fit
    common = {"name": "tiny", "preprocessing": SMALL, "intended_use": "Research use only."}
    plain = read_manifest(save_artifact(network, tmp_path / "plain", **common))
    assert "applicability" not in plain.to_dict() and plain.version_id == _legacy_version_id(plain)
    fitted = read_manifest(save_artifact(network, tmp_path / "fitted", applicability=model, **common))
    other = fit_applicability_on(network, image(batch=24, seed=4), source="other inputs")
    refitted = read_manifest(save_artifact(network, tmp_path / "refitted", applicability=other, **common))
    assert fitted.weights_sha256 == plain.weights_sha256 == refitted.weights_sha256
    assert len({plain.version_id, fitted.version_id, refitted.version_id}) == 3
    again, manifest = load_artifact(tmp_path / "fitted")
    assert manifest.applicability is not None and manifest.applicability.to_dict() == model.to_dict()
    assert Manifest.from_dict(manifest.to_dict()).version_id == fitted.version_id


def test_a_manifest_refuses_an_applicability_model_of_another_width(tmp_path: Path) -> None:
    wrong = fit_applicability(_gaussian(40, 0), method="mahalanobis-pca4")
    with pytest.raises(Exception, match="feature channels"):
        save_artifact(
            tiny(), tmp_path, name="tiny", preprocessing=SMALL, intended_use="Research use only.", applicability=wrong
        )


def test_engine_fills_applicability_from_the_same_forward(tiny_fit: tuple[torch.nn.Module, ApplicabilityModel]) -> None:
    network, model = tiny_fit
    calls = {"n": 0}
    original = network.forward_features

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return original(x)

    network.forward_features = counted  # type: ignore[method-assign]
    try:
        engine = Engine(network, recipe=SMALL, model_version="v", device="cpu", freeze=False, applicability=model)
        rng = np.random.default_rng(0)
        images = [rng.random((80, 80), dtype=np.float32) for _ in range(3)]
        predictions = engine.predict(images)
        assert calls["n"] == 1  # one batch, one forward: the score comes from its pooled features
        expected = model.score(pooled_of(network, torch.stack([engine_input(engine, x) for x in images])))
    finally:
        del network.forward_features
    for prediction, score in zip(predictions, expected, strict=True):
        assert isinstance(prediction, Prediction) and prediction.applicability is not None
        assert prediction.applicability.score == pytest.approx(score, rel=1e-4)
        assert prediction.applicability.in_domain == (prediction.applicability.score <= model.threshold)
    plain = Engine(network, recipe=SMALL, model_version="v", device="cpu", freeze=False)
    assert plain.predict(images[:1])[0].applicability is None


def engine_input(engine: Engine, pixels: np.ndarray) -> torch.Tensor:
    from model.engine import prepare

    return prepare(pixels, engine.recipe)


def test_engine_refuses_a_model_of_another_width() -> None:
    wrong = fit_applicability(_gaussian(40, 0), method="mahalanobis-pca4")
    with pytest.raises(Exception, match="feature channels"):
        Engine(tiny(arch=Architecture.tiny()), recipe=SMALL, model_version="v", device="cpu", applicability=wrong)


# --- chexd model import ----------------------------------------------------------------------------------------------


def test_import_fits_on_a_dicom_validation_folder_and_says_when_none_was_given(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from daemon.cli.model import model_app
    from daemon.cli.phantom import phantom
    from tests.nets import torchvision_tiny

    app = typer.Typer()
    app.add_typer(model_app, name="model")
    torch.save(torchvision_tiny().state_dict(), tmp_path / "random.pt")
    phantom(tmp_path / "val", count=12, size=64)
    fitted = CliRunner().invoke(
        app,
        [
            "model",
            "import",
            str(tmp_path / "random.pt"),
            "--out",
            str(tmp_path / "a"),
            "--validation-dicom",
            str(tmp_path / "val"),
            "--validation-labels",
            str(tmp_path / "val" / "labels.csv"),
        ],
    )
    assert fitted.exit_code == 0, fitted.output
    manifest = read_manifest(tmp_path / "a")
    assert manifest.applicability is not None and manifest.applicability.n_images == 12
    text = " ".join(fitted.stdout.split())
    assert "applicability: mahalanobis-pca" in text and "fitted on 12 validation images" in text and "in-sample" in text
    bare = CliRunner().invoke(app, ["model", "import", str(tmp_path / "random.pt"), "--out", str(tmp_path / "b")])
    assert bare.exit_code == 0 and read_manifest(tmp_path / "b").applicability is None
    assert "NO applicability model" in " ".join(bare.stdout.split())
    half = CliRunner().invoke(app, ["model", "import", str(tmp_path / "random.pt"), "--validation-dicom", "x"])
    assert half.exit_code == 2 and "--validation-labels" in half.output


# --- every artifact chexd makes carries one ------------------------------------------------------------------------


def test_write_candidate_carries_the_parents_model_or_fits_one_and_refuses_a_stale_one(tmp_path: Path) -> None:
    from daemon.maintenance import load_parent, write_candidate
    from daemon.settings import Settings

    network = tiny(seed=5)
    model = fit_applicability_on(network, image(batch=24, seed=3), source="parent validation")
    parent_file = save_artifact(
        network, tmp_path / "parent", name="tiny", preprocessing=SMALL, intended_use="Research use only.",
        applicability=model,
    )  # fmt: skip
    settings = Settings(data_dir=tmp_path / "data", model_path=str(parent_file))
    parent = load_parent(settings, None)
    common = {"params": {}, "report": {}, "check": lambda reloaded: {}}
    head_only = write_candidate(settings, parent.network, parent.manifest, operation="calibrate", **common)
    assert read_manifest(head_only.path).applicability.to_dict() == model.to_dict()  # type: ignore[union-attr]
    refit = write_candidate(settings, parent.network, parent.manifest, operation="correct",
                            applicability_inputs=image(batch=24, seed=9), **common)  # fmt: skip
    fitted = read_manifest(refit.path).applicability
    assert fitted is not None and fitted.to_dict() != model.to_dict() and "correct job" in fitted.source
    other = tiny(seed=6, arch=Architecture.densenet((2, 2, 2, 1), growth_rate=4, bn_size=2, stem_channels=8))
    with pytest.raises(ValueError, match="fitted again"):
        write_candidate(settings, other, parent.manifest, operation="compress", **common)

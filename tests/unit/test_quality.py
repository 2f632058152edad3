"""Input-quality checks on decoded pixels: each check flags its case and passes a usable phantom radiograph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.phantom import generate
from model.quality import check_pixels, inversion_cue

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-cxr"


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return generate(0, 3, size=256).image


def codes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **kwargs: int) -> list[str]:
    return [issue.code for issue in check_pixels(pixels, photometric=photometric, **kwargs)]


def test_a_phantom_chest_film_has_no_issue(chest: np.ndarray) -> None:
    assert codes(chest) == []
    assert inversion_cue(chest) > 0.15


def test_an_inverted_film_is_flagged_with_its_photometric_interpretation(chest: np.ndarray) -> None:
    (issue,) = check_pixels(1.0 - chest, photometric="MONOCHROME1")
    assert issue.code == "inverted" and "MONOCHROME1" in issue.reason and "mediastinum" in issue.reason


def test_a_nearly_constant_image_is_only_constant() -> None:
    flat = np.full((256, 256), 0.4, np.float32) + np.random.default_rng(0).normal(0, 0.005, (256, 256)).astype(
        np.float32
    )
    assert codes(np.clip(flat, 0, 1)) == ["constant"]


def test_a_clipped_white_image_is_saturated(chest: np.ndarray) -> None:
    assert codes(np.clip(chest * 3.0, 0, 1)) == ["saturated"]
    assert "saturated" not in codes(chest)


def test_a_very_noisy_image_is_noisy(chest: np.ndarray) -> None:
    noisy = np.clip(chest + np.random.default_rng(1).normal(0, 0.15, chest.shape), 0, 1).astype(np.float32)
    assert codes(noisy) == ["noisy"]
    mild = np.clip(chest + np.random.default_rng(1).normal(0, 0.01, chest.shape), 0, 1).astype(np.float32)
    assert codes(mild) == []


def test_too_few_pixels(chest: np.ndarray) -> None:
    small = chest[::2, ::2]
    assert codes(small) == ["too_few_pixels"]
    assert codes(small, min_side=128) == []


def test_bad_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        check_pixels(np.zeros((2, 3, 4)), photometric="MONOCHROME2")
    with pytest.raises(ValueError, match="photometric"):
        check_pixels(np.zeros((8, 8)), photometric="RGB")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_pixels(np.full((8, 8), 2.0), photometric="MONOCHROME2")


def test_a_real_film_mislabelled_monochrome1_is_inverted_and_the_real_films_are_not() -> None:
    from model.preprocess import decode_file

    assert codes(decode_file(REAL / "Fake_MONOHR1.dcm"), "MONOCHROME1") == ["inverted"]
    for name in ("siim-ptx-1.2.276.0.7230010.3.1.4.8323329.6904.dcm", "h0001.png", "nih/00000001_000.png"):
        assert codes(decode_file(REAL / name), "MONOCHROME2" if name.endswith(".dcm") else "") == []

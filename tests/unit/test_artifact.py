"""model.artifact: safetensors + JSON manifest, written atomically and verified on load."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.artifact import (
    ArtifactError,
    Manifest,
    content_hash,
    load_artifact,
    provenance_entry,
    read_manifest,
    save_artifact,
    sha256_file,
)
from model.errors import ModelError
from model.types import CHEXNET_RECIPE, LABELS, PreprocessRecipe
from tests.nets import image, tiny

SMALL = PreprocessRecipe(input_size=64, resize=None)
USE = "Research use only."


def save(model, path: Path, **fields) -> Path:  # type: ignore[no-untyped-def]
    defaults = {"name": "tiny", "preprocessing": SMALL, "intended_use": USE}
    return save_artifact(model, path, **{**defaults, **fields})


def rewrite_weights(manifest_file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights and fix the manifest's hash, so only the content check can object."""
    weights = manifest_file.with_suffix(".safetensors")
    save_file(tensors, str(weights))
    data = json.loads(manifest_file.read_text())
    data["weights_sha256"] = sha256_file(weights)
    manifest_file.write_text(json.dumps(data))


def test_float32_round_trip_is_exact(tmp_path: Path) -> None:
    model = tiny(seed=1)
    record = provenance_entry("train", {"epochs": 3})
    manifest_file = save(
        model,
        tmp_path / "out",
        dtype="float32",
        version="1.2.0",
        thresholds={label: 0.3 for label in LABELS},
        metrics={"mean_auroc": 0.85},
        provenance=[record],
    )
    assert manifest_file == tmp_path / "out" / "tiny.json"
    assert (tmp_path / "out" / "tiny.safetensors").is_file()
    text = manifest_file.read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    for handle in (tmp_path / "out", manifest_file, manifest_file.with_suffix(".safetensors")):
        loaded, manifest = load_artifact(handle)
        assert not loaded.training
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    assert manifest.labels == LABELS and manifest.version == "1.2.0" and manifest.dtype == "float32"
    assert manifest.thresholds == {label: 0.3 for label in LABELS}
    assert manifest.architecture == model.architecture
    assert manifest.parameters == model.architecture.parameters()
    assert manifest.weights_sha256 == sha256_file(manifest_file.with_suffix(".safetensors"))
    assert content_hash(manifest) == manifest.version_id[:12] == manifest.short_hash
    assert manifest.provenance[0]["operation"] == "train"
    assert datetime.fromisoformat(manifest.provenance[0]["created_at"]).utcoffset().total_seconds() == 0
    assert manifest.provenance[0]["tool"].startswith("chexd ")
    assert Manifest.from_dict(json.loads(text)) == manifest
    x = image(size=64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_float16_round_trip_is_close_and_same_weights_give_the_same_hash(tmp_path: Path) -> None:
    model = tiny(seed=2)
    first = save(model, tmp_path / "a.json", dtype="float16")
    again = save(model, tmp_path / "b" / "tiny.safetensors", dtype="float16")
    assert first == tmp_path / "a.json" and again == tmp_path / "b" / "tiny.json"
    stored = load_file(str(first.with_suffix(".safetensors")))
    assert stored["classifier.weight"].dtype == torch.float16
    assert stored["features.norm0.num_batches_tracked"].dtype == torch.int64
    loaded, manifest = load_artifact(first)
    assert manifest.dtype == "float16" and read_manifest(again).weights_sha256 == manifest.weights_sha256
    x = image(size=64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.sigmoid(loaded(x)), torch.sigmoid(model(x)), atol=1e-3, rtol=0)
    for key, value in model.state_dict().items():  # exactly the float16 rounding, nothing else
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key


def test_thresholds_default_to_one_half(tmp_path: Path) -> None:
    manifest = read_manifest(save(tiny(), tmp_path))
    assert manifest.thresholds == dict.fromkeys(LABELS, 0.5)


def test_tampered_weights_fail_the_hash_check(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path)
    weights = manifest_file.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    expected = read_manifest(manifest_file).weights_sha256
    with pytest.raises(
        ArtifactError, match=f"weights do not match manifest hash: expected {expected} got [0-9a-f]{{64}}"
    ):
        load_artifact(manifest_file)


def test_missing_and_extra_keys_are_named(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path, dtype="float32")
    tensors = load_file(str(manifest_file.with_suffix(".safetensors")))
    del tensors["features.denseblock2.denselayer1.conv2.weight"]
    tensors["fc.weight"] = torch.zeros(14, 16)
    rewrite_weights(manifest_file, tensors)
    with pytest.raises(ArtifactError) as info:
        load_artifact(manifest_file)
    assert "1 missing: 'features.denseblock2.denselayer1.conv2.weight'" in str(info.value)
    assert "1 unexpected: 'fc.weight'" in str(info.value)
    assert isinstance(info.value, ModelError)


def test_wrong_shape_and_wrong_dtype_are_named(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path, dtype="float32")
    tensors = load_file(str(manifest_file.with_suffix(".safetensors")))
    good = dict(tensors)
    tensors["classifier.weight"] = torch.zeros(14, 15)
    rewrite_weights(manifest_file, tensors)
    with pytest.raises(
        ArtifactError, match=r"'classifier.weight' has shape \[14, 15\], the architecture expects \[14, 16\]"
    ):
        load_artifact(manifest_file)
    good["classifier.bias"] = good["classifier.bias"].half()
    rewrite_weights(manifest_file, good)
    with pytest.raises(ArtifactError, match="'classifier.bias' is torch.float16, the manifest says float32"):
        load_artifact(manifest_file)


def test_label_count_must_match_the_architecture(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path)
    data = json.loads(manifest_file.read_text())
    data["labels"] = data["labels"][:13]
    data["thresholds"].pop(LABELS[13])
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"13 labels but the architecture has 14 outputs"):
        load_artifact(manifest_file)


def test_missing_manifest_fields_are_listed(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path)
    data = json.loads(manifest_file.read_text())
    del data["weights_sha256"], data["intended_use"]
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"missing fields \['intended_use', 'weights_sha256'\]"):
        load_artifact(tmp_path)


def test_dummy_forward_must_give_finite_logits(tmp_path: Path) -> None:
    manifest_file = save(tiny(), tmp_path, dtype="float32")
    tensors = load_file(str(manifest_file.with_suffix(".safetensors")))
    tensors["features.norm5.running_var"] = -torch.ones_like(tensors["features.norm5.running_var"])
    rewrite_weights(manifest_file, tensors)
    with pytest.raises(ArtifactError, match=r"dummy forward gave \[1, 14\] non-finite outputs"):
        load_artifact(manifest_file)


def test_manifest_rules(tmp_path: Path) -> None:
    model = tiny()
    with pytest.raises(ArtifactError, match="Invalid threshold for 'Effusion': 1.2 - must be in \\(0, 1\\)"):
        save(model, tmp_path, thresholds={**dict.fromkeys(LABELS, 0.5), "Effusion": 1.2})
    with pytest.raises(ArtifactError, match="must say 'synthetic demo model, not for diagnosis'"):
        save(model, tmp_path, synthetic=True)
    with pytest.raises(ArtifactError, match="Invalid version 'v1'"):
        save(model, tmp_path, version="v1")
    with pytest.raises(ArtifactError, match="Invalid preprocessing channels 1 - the architecture takes 3"):
        save(model, tmp_path, preprocessing=PreprocessRecipe(channels=1, normalization="xrv", resize=None))
    with pytest.raises(ArtifactError, match="Invalid labels: 3 labels but the architecture has 14 outputs"):
        save(model, tmp_path, labels=LABELS[:3])
    assert not any(tmp_path.iterdir()), "nothing is written for an invalid manifest"
    ok = save(model, tmp_path, synthetic=True, intended_use="Synthetic demo model, not for diagnosis.")
    assert read_manifest(ok).synthetic


def test_non_finite_weights_are_not_saved(tmp_path: Path) -> None:
    model = tiny()
    with torch.no_grad():
        model.classifier.weight[0, 0] = 1e6  # fine in float32, infinite in float16
    save(model, tmp_path / "f32", dtype="float32")
    with pytest.raises(ArtifactError, match="'classifier.weight' has non-finite values as float16"):
        save(model, tmp_path / "f16", dtype="float16")


def test_a_folder_without_exactly_one_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="found none"):
        load_artifact(tmp_path)
    save(tiny(), tmp_path, name="a")
    save(tiny(), tmp_path, name="b")
    with pytest.raises(ArtifactError, match="found a.json, b.json"):
        load_artifact(tmp_path)


def test_full_size_recipe_is_checked_by_the_dummy_forward(tmp_path: Path) -> None:
    loaded, manifest = load_artifact(save(tiny(), tmp_path, preprocessing=CHEXNET_RECIPE))
    assert manifest.preprocessing.input_size == 224 and loaded.architecture.num_classes == 14


def test_the_manifest_is_read_without_torch(tmp_path: Path) -> None:
    """model.manifest is the torch-free door: a fresh interpreter reads and validates a manifest without torch."""
    manifest_file = save(tiny(seed=1), tmp_path / "out")
    expected = read_manifest(manifest_file).version_id
    code = (
        "import sys\n"
        "from model.manifest import Manifest, read_manifest\n"
        f"manifest = read_manifest({str(manifest_file)!r})\n"
        "assert isinstance(manifest, Manifest)\n"
        "print(manifest.version_id)\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "model.manifest loaded torch"
    assert result.stdout.strip() == expected


def test_the_artifact_module_re_exports_the_manifest_door() -> None:
    import model.manifest

    assert Manifest is model.manifest.Manifest
    assert ArtifactError is model.manifest.ArtifactError
    assert read_manifest is model.manifest.read_manifest

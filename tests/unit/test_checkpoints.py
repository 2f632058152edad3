"""model.checkpoints and ``chexd model import``: foreign checkpoint layouts become verified chexd artifacts.

Each foreign layout is written here from the module that produces it in the wild (torchvision's DenseNet class, the
CheXNet wrapper, a torchxrayvision-shaped net), shrunk to a tiny DenseNet but with the exact key conventions, so
every converter is proven by comparing logits with the source module.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision
import typer
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from daemon.cli.model import model_app
from model.artifact import load_artifact, read_manifest, save_artifact, sha256_file
from model.checkpoints import XRV_PATHOLOGIES, CheckpointError, detect_format, import_checkpoint
from model.errors import ModelError
from model.network import Architecture, DenseNet, LayerSpec, TransitionSpec
from model.types import CHEXNET_RECIPE, LABELS, XRV_RECIPE, PreprocessRecipe
from tests.nets import TORCHVISION_TINY as TINY
from tests.nets import image, randomize, torchvision_tiny


class CheXNet121(nn.Module):
    """arnoweng/CheXNet's ``DenseNet121`` wrapper (torchvision net, Linear + Sigmoid head), on a tiny DenseNet."""

    def __init__(self) -> None:
        super().__init__()
        self.densenet121 = torchvision.models.DenseNet(**TINY)
        self.densenet121.classifier = nn.Sequential(
            nn.Linear(self.densenet121.classifier.in_features, 14), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.densenet121(x)


def write_chexnet(path: Path, seed: int = 0) -> nn.Module:
    """``model.pth.tar`` as CheXNet's training script saved it: DataParallel keys, pre-0.4 names, legacy pickle."""
    source = randomize(nn.DataParallel(CheXNet121()), seed)
    old_names = {}
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):  # PyTorch 0.3 had no batch counters
            continue
        old_names[re.sub(r"(denselayer\d+\.)(norm|conv)([12])\.", r"\1\2.\3.", key)] = value
    optimizer = torch.optim.Adam(source.parameters(), lr=1e-3)
    source(image(batch=2, size=32)).sum().backward()
    optimizer.step()
    checkpoint = {
        "state_dict": old_names,
        "epoch": 7,
        "best_loss": torch.tensor(0.151),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return source.eval()


def xrv_source(seed: int = 0) -> nn.Module:
    """A torchxrayvision-shaped DenseNet: 1-channel conv0, 18 outputs, an ``op_threshs`` buffer (NaN = untrained)."""
    net = torchvision.models.DenseNet(**TINY, num_classes=18)
    net.features.conv0 = nn.Conv2d(1, 8, kernel_size=7, stride=2, padding=3, bias=False)
    threshs = torch.linspace(0.05, 0.9, 18)
    threshs[XRV_PATHOLOGIES.index("Hernia")] = math.nan
    net.register_buffer("op_threshs", threshs)
    return randomize(net, seed)


def test_chexnet_checkpoint_imports_with_identical_outputs(tmp_path: Path) -> None:
    src = tmp_path / "chexnet_tiny.pth.tar"
    source = write_chexnet(src)
    raw = torch.load(src, weights_only=True)
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in raw["state_dict"]
    assert "module.densenet121.classifier.0.weight" in raw["state_dict"]
    assert detect_format(src) == "chexnet"
    manifest_file = import_checkpoint(src, tmp_path / "out")
    model, manifest = load_artifact(manifest_file)
    assert manifest.name == "chexnet_tiny" and manifest.labels == LABELS
    assert manifest.preprocessing == CHEXNET_RECIPE and manifest.dtype == "float32"
    assert manifest.architecture == Architecture.tiny()
    record = manifest.provenance[-1]
    assert record["operation"] == "import" and record["parent_sha256"] is None
    assert record["parameters"] == {
        "source_format": "chexnet",
        "source_file_name": "chexnet_tiny.pth.tar",
        "source_sha256": sha256_file(src),
    }
    x = image(size=64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.sigmoid(model(x)), source(x), atol=1e-6, rtol=0)


def test_xrv_state_dict_maps_rows_and_thresholds_by_name(tmp_path: Path) -> None:
    source = xrv_source(seed=2)
    src = tmp_path / "xrv-densenet.pt"
    torch.save(source.state_dict(), src)
    assert detect_format(src) == "xrv"
    model, manifest = load_artifact(import_checkpoint(src, tmp_path / "out", name="xrv"))
    assert manifest.preprocessing == XRV_RECIPE and manifest.architecture.in_channels == 1
    x = image(channels=1, size=64)
    with torch.inference_mode():
        expected = source(x)
        logits = model(x)
    for j, label in enumerate(LABELS):
        torch.testing.assert_close(logits[:, j], expected[:, XRV_PATHOLOGIES.index(label)], atol=1e-6, rtol=0)
        want = 0.5 if label == "Hernia" else float(source.op_threshs[XRV_PATHOLOGIES.index(label)])
        assert manifest.thresholds[label] == pytest.approx(want), label
    assert manifest.thresholds["Effusion"] != manifest.thresholds["Atelectasis"]


@pytest.mark.parametrize("container", ["pt", "safetensors", "dataparallel"])
def test_torchvision_state_dict_imports_with_identical_outputs(tmp_path: Path, container: str) -> None:
    source = torchvision_tiny(seed=3)
    state = source.state_dict()
    src = tmp_path / f"densenet.{'safetensors' if container == 'safetensors' else 'pth'}"
    if container == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    else:
        torch.save({f"module.{k}": v for k, v in state.items()} if container == "dataparallel" else state, src)
    assert detect_format(src) == "torchvision"
    model, manifest = load_artifact(import_checkpoint(src, tmp_path / "out.json", format="torchvision"))
    assert manifest.name == "densenet" and manifest.thresholds == dict.fromkeys(LABELS, 0.5)
    x = image(size=64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), source(x), atol=1e-6, rtol=0)


def test_other_densenet_shapes_and_thinned_nets_import(tmp_path: Path) -> None:
    variant = randomize(
        torchvision.models.DenseNet(
            growth_rate=6, block_config=(3, 1, 2), num_init_features=12, bn_size=3, num_classes=14
        )
    )
    thinned_arch = Architecture(
        stem_channels=6,
        blocks=(
            (LayerSpec(bottleneck=5, growth=3), LayerSpec(bottleneck=7, growth=2)),
            (LayerSpec(bottleneck=4, growth=5),),
        ),
        transitions=(TransitionSpec(out_channels=9),),
    )
    thinned = randomize(DenseNet(thinned_arch))
    for source, name in ((variant, "variant"), (thinned, "thinned")):
        torch.save(source.state_dict(), tmp_path / f"{name}.pt")
        model, manifest = load_artifact(import_checkpoint(tmp_path / f"{name}.pt", tmp_path / name))
        x = image(size=64)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), source(x), atol=1e-6, rtol=0)
    assert manifest.architecture == thinned_arch
    assert manifest.parameters == sum(p.numel() for p in thinned.parameters())


def test_artifact_import_verifies_and_records_its_parent(tmp_path: Path) -> None:
    original = save_artifact(
        randomize(DenseNet(Architecture.tiny())),
        tmp_path / "src",
        name="demo",
        version="2.1.0",
        preprocessing=PreprocessRecipe(input_size=64, resize=None),
        intended_use="Synthetic demo model, not for diagnosis.",
        synthetic=True,
    )
    parent = read_manifest(original)
    for handle in (tmp_path / "src", original, original.with_suffix(".safetensors")):
        assert detect_format(handle) == "artifact"
    copied = read_manifest(import_checkpoint(tmp_path / "src", tmp_path / "dst"))
    assert (copied.name, copied.version, copied.synthetic, copied.dtype) == ("demo", "2.1.0", True, "float16")
    assert copied.weights_sha256 == parent.weights_sha256  # same tensors, same bytes
    assert copied.provenance[-1]["parent_sha256"] == parent.weights_sha256
    assert copied.provenance[-1]["parameters"]["source_format"] == "artifact"
    renamed = read_manifest(import_checkpoint(original, tmp_path / "dst2", name="renamed"))
    assert renamed.name == "renamed"


class Evil:
    """Unpickling this would create a file; weights_only must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_is_refused_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "model.pth.tar"
    torch.save({"state_dict": torchvision_tiny().state_dict(), "hook": Evil(marker)}, src)
    with pytest.raises(CheckpointError, match=r"model.pth.tar: refused to unpickle - it holds \S+, not only tensors"):
        import_checkpoint(src, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


class CallsSystem:
    """Unpickling this would run a shell command (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle", "protocol5"])
def test_a_refused_pickle_says_why_chexd_never_unpickles_and_never_suggests_weights_only_false(
    tmp_path: Path, kind: str
) -> None:
    import pickle

    marker = tmp_path / "pwned"
    src = tmp_path / f"{kind}.pth"
    if kind == "torch_zip":
        torch.save({"state_dict": torchvision_tiny().state_dict(), "hook": CallsSystem(marker)}, src)
    elif kind == "raw_pickle":
        src.write_bytes(pickle.dumps(CallsSystem(marker), protocol=2))
    else:  # an opcode torch's weights-only unpickler does not take (a refusal without a named global)
        src.write_bytes(pickle.dumps({"a": bytearray(b"x")}, protocol=5))
    with pytest.raises(CheckpointError) as info:
        import_checkpoint(src, tmp_path / "out")
    message = str(info.value)
    assert "refused to unpickle" in message and "a pickle can run any code" in message
    assert "torch.save(model.state_dict()" in message and "safetensors" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "Re-running" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def resnet_state(tmp_path: Path) -> Path:
    src = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), src)
    return src


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(bytes(range(7, 200))), r"not a checkpoint - starts with bytes 07 08 09"),
        (lambda p: p.write_bytes(b"\x80\x02" + bytes(range(60))), r"cannot read as a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), r"empty file"),
        (
            lambda p: p.write_text('{"hello": 1}'),
            r"a JSON file with keys \['hello'\] but not a chexd artifact manifest",
        ),
        (lambda p: p.write_text("{not json"), r"starts like JSON but is not valid JSON"),
        (lambda p: torch.save([torch.zeros(2)], p), r"holds a list, not a state dict"),
        (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), r"holds non-tensor values, e.g. 'epoch'"),
        (
            lambda p: save_file(
                {"fc.weight": torch.zeros(2, 2), "features.conv0.weight": torch.zeros(8, 3, 7, 7)}, str(p)
            ),
            r"has 1 of 2 keys that are not DenseNet121 keys, e.g. 'fc.weight'",
        ),
        (lambda p: torch.save(torchvision_tiny(num_classes=1000).state_dict(), p), r"ImageNet head with 1000 outputs"),
        (
            lambda p: torch.save(torchvision_tiny(num_classes=5).state_dict(), p),
            r"classifier has 5 outputs - expected 14",
        ),
    ],
)
def test_files_that_are_not_importable_checkpoints_fail_clearly(tmp_path: Path, write, message: str) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "suspect.bin"
    write(src)
    with pytest.raises(CheckpointError, match=message) as info:
        import_checkpoint(src, tmp_path / "out")
    assert str(src) in str(info.value)
    assert isinstance(info.value, ModelError)


def test_a_resnet_is_not_a_densenet(tmp_path: Path) -> None:
    src = resnet_state(tmp_path)
    n = len(torch.load(src, weights_only=True))
    with pytest.raises(
        CheckpointError, match=rf"resnet18.pth: has {n} of {n} keys that are not DenseNet121 keys, e.g. 'conv1.weight'"
    ):
        detect_format(src)


def test_channel_subset_pruning_cannot_be_guessed_from_shapes(tmp_path: Path) -> None:
    state = torchvision_tiny().state_dict()
    prefix = "features.denseblock1.denselayer2"
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        state[f"{prefix}.norm1.{suffix}"] = state[f"{prefix}.norm1.{suffix}"][:-1]
    state[f"{prefix}.conv1.weight"] = state[f"{prefix}.conv1.weight"][:, :-1]
    torch.save(state, tmp_path / "pruned.pt")
    with pytest.raises(
        CheckpointError, match=r"denselayer2.norm1.weight' has shape \[11\].*expects \[12\].*kept_inputs"
    ):
        import_checkpoint(tmp_path / "pruned.pt", tmp_path / "out")


def test_an_explicit_format_must_match_the_file(tmp_path: Path) -> None:
    torch.save(torchvision_tiny().state_dict(), tmp_path / "tv.pt")
    with pytest.raises(CheckpointError, match="expected a xrv checkpoint but found torchvision"):
        import_checkpoint(tmp_path / "tv.pt", tmp_path / "out", format="xrv")
    with pytest.raises(CheckpointError, match="no such file"):
        import_checkpoint(tmp_path / "missing.pt", tmp_path / "out")


# ----------------------------------------------------------------------------------------------- chexd model import
def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(model_app, name="model")
    return app


def test_cli_import_writes_into_the_model_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CHEXD_CONFIG", raising=False)
    src = tmp_path / "chexnet.pth.tar"
    write_chexnet(src)
    runner = CliRunner()
    first = runner.invoke(cli(), ["model", "import", str(src), "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["source_format"] == "chexnet" and summary["name"] == "chexnet"
    folder = tmp_path / "data" / "models" / f"chexnet-{summary['content_hash']}"
    assert summary["path"] == str(folder / "chexnet.json")
    load_artifact(folder)
    again = runner.invoke(cli(), ["model", "import", str(src), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["path"] == summary["path"]
    names = sorted(p.name for p in (tmp_path / "data" / "models").iterdir())
    assert folder.name in names and not [n for n in names if n.startswith(".")], "no staging left"
    assert summary["registry"]["state"] == "candidate"
    assert again.exit_code == 0 and json.loads(again.stdout)["registry"] == summary["registry"], "registered once"
    text = runner.invoke(cli(), ["model", "import", str(src), "--out", str(tmp_path / "x"), "--dtype", "float16"])
    assert text.exit_code == 0 and "imported chexnet chexnet.pth.tar as chexnet 1.0.0" in text.stdout
    assert read_manifest(tmp_path / "x").dtype == "float16"


def test_cli_import_errors_exit_1_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "notes.json"
    src.write_text("[1, 2]")
    result = CliRunner().invoke(cli(), ["model", "import", str(src), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "not a chexd artifact manifest" in result.stderr
    bad = CliRunner().invoke(cli(), ["model", "import", str(src), "--format", "onnx"])
    assert bad.exit_code == 2 and "Invalid --format 'onnx'" in bad.stderr


def test_the_bundled_full_demo_model_imports_by_name_beside_the_compressed_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.store.registry import bundled_demo_model

    monkeypatch.setenv("CHEXD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CHEXD_CONFIG", raising=False)
    default, full = read_manifest(bundled_demo_model()), read_manifest(bundled_demo_model("full"))
    assert default.provenance[-1]["operation"] == "compress"
    assert default.provenance[-1]["parent_sha256"] == full.weights_sha256
    assert default.parameters < 0.5 * full.parameters == 0.5 * 6_968_206
    assert default.synthetic and full.synthetic
    result = CliRunner().invoke(cli(), ["model", "import", "bundled:full", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["parameters"] == 6_968_206 and summary["registry"]["state"] == "candidate"
    listed = CliRunner().invoke(cli(), ["model", "list"], terminal_width=200)
    assert listed.exit_code == 0 and "0.8138" in listed.stdout  # the full one's test AUROC
    assert f"{default.metrics['test']['mean_after']:.4f}" in listed.stdout  # the compressed default's, after compress
    wrong = CliRunner().invoke(cli(), ["model", "import", "bundled:huge"])
    assert wrong.exit_code == 2 and "bundled:compressed or bundled:full" in wrong.output

"""Model Zoo-style distribution: metadata schema, verify_net_in_out, ckpt_export (TorchScript parity),
deterministic packaging, download with MONAI's own `download --url file://`, inference from the download without
the repository's `custom` importable, sha256 refusal, and encoder chaining from a bundle zip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import REPO, TINY

from custom.bundle_check import metadata_problems, validate_metadata
from custom.errors import InputError
from custom.networks import Encoder, FrozenEncoderUNet, PooledEncoder, load_encoder_weights
from custom.packaging import fetch_bundle, package_bundle, sha256_of, verify_bundle_zip
from custom.segmentation import DownstreamSettings, build_network, load_trained

BUNDLES = ("seqinv_pretrain", "ixi_tissue_seg", "arc_lesion_seg", "ixi_denoise")
DOWNSTREAM = {
    "ixi_tissue_seg": ("segmentation", 4),
    "arc_lesion_seg": ("segmentation", 2),
    "ixi_denoise": ("regression", 1),
}

# Runs `python -m monai.bundle ...` with the repository's `custom` package made unimportable: the editable-install
# finder is dropped and the repository root is removed from sys.path, and the script checks that
# `import custom` then fails before handing over to MONAI.
_WITHOUT_REPO = """
import os, runpy, sys
repo = os.path.realpath(sys.argv[1])
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()
                    and "editable" not in type(f).__name__.lower()]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != repo]
try:
    import custom
except ImportError:
    pass
else:
    raise SystemExit("custom is still importable from " + str(custom.__file__))
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def _copy_bundle(name: str, dest: Path) -> Path:
    """A copy of ``bundles/<name>`` without local runs or weights (as in a fresh clone)."""
    target = dest / name
    shutil.copytree(
        REPO / "bundles" / name, target, ignore=shutil.ignore_patterns("runs", "*.pt", "*.ts", "model.json")
    )
    return target


def _tiny_downstream_weights(bundle: Path, name: str) -> Path:
    """Seeded random TINY-size weights and their model.json in ``bundle/models`` (what training writes)."""
    task, channels = DOWNSTREAM[name]
    settings = DownstreamSettings(
        task=task,
        out_channels=channels,
        encoder_features=TINY["encoder_features"],
        decoder_features=TINY["decoder_features"],
        dropout=0.0,
        pixdim=TINY["pixdim"],
        patch_size=TINY["patch_size"],
        normalize="zscore" if task == "regression" else "percentile",
        class_names=["background", "lesion"] if channels == 2 else ["background", "GM", "WM", "CSF"][:channels],
    )
    torch.manual_seed(0)
    network = build_network(settings)
    weights = bundle / "models" / "model.pt"
    torch.save(network.state_dict(), weights)
    weights.with_suffix(".json").write_text(json.dumps(settings.to_dict()))
    return weights


def _tiny_encoder_weights(bundle: Path) -> Path:
    torch.manual_seed(0)
    weights = bundle / "models" / "model.pt"
    torch.save(Encoder(features=TINY["encoder_features"]).state_dict(), weights)
    return weights


def _write_scan(path: Path, shape=(30, 34, 28), spacing=6.0) -> Path:
    rng = np.random.default_rng(0)
    data = np.zeros(shape, np.float32)
    data[5:-5, 6:-6, 5:-5] = 1.0 + rng.random((shape[0] - 10, shape[1] - 12, shape[2] - 10), dtype=np.float32)
    affine = np.diag([-spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


# ----------------------------------------------------------------------------------------------- metadata schema


@pytest.mark.parametrize("name", BUNDLES)
def test_every_bundle_metadata_follows_the_specification(name):
    metadata = validate_metadata(REPO / "bundles" / name)
    assert metadata["name"] == name
    assert metadata["version"] in metadata["changelog"]


def test_schema_reports_missing_keys_tensor_fields_and_changelog(tmp_path):
    metadata = json.loads((REPO / "bundles/ixi_tissue_seg/configs/metadata.json").read_text())
    del metadata["copyright"]
    del metadata["network_data_format"]["outputs"]["pred"]["dtype"]
    metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["sixteen", 16, 16]
    metadata["version"] = "0.2.0"
    problems = "\n".join(metadata_problems(metadata))
    assert "'copyright' is a required property" in problems
    assert "network_data_format/outputs/pred: 'dtype' is a required property" in problems
    assert "spatial_shape/0" in problems
    assert "no entry for version '0.2.0'" in problems
    path = tmp_path / "configs" / "metadata.json"
    path.parent.mkdir()
    path.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="metadata.json: metadata does not follow"):
        validate_metadata(tmp_path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        validate_metadata(path)


# ------------------------------------------------------------------------ verify_net_in_out and ckpt_export


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out(name, tmp_path):
    """MONAI's verify_net_in_out on each bundle's network as a fresh clone has it (paper widths, no weights)."""
    from monai.bundle import verify_net_in_out

    bundle = _copy_bundle(name, tmp_path)
    net_id, extra = (
        ("encoder_def", {}) if name == "seqinv_pretrain" else ("network_def", {"pretrained_encoder": "random"})
    )
    verify_net_in_out(
        net_id=net_id,
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "train.yaml"),
        device="cpu",
        n=2,  # spatial shape 16*n = 32^3
        bundle_root=str(bundle),
        **extra,
    )


def test_verify_net_in_out_command_line_catches_a_wrong_channel_count(tmp_path):
    """The `python -m monai.bundle verify_net_in_out` command itself, and that it fails on wrong metadata."""
    bundle = _copy_bundle("seqinv_pretrain", tmp_path)
    _tiny_encoder_weights(bundle)  # 16 output features, metadata says 768
    cmd = [
        sys.executable, "-m", "monai.bundle", "verify_net_in_out", "encoder_def",
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--config_file", str(bundle / "configs" / "train.yaml"), "--device", "cpu", "--n", "2",
    ]  # fmt: skip
    wrong = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert wrong.returncode != 0 and "doesn't match: `768`" in wrong.stderr
    right = subprocess.run(
        [*cmd, "--_meta_#network_data_format#outputs#pred#num_channels", "16"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert right.returncode == 0, right.stderr[-2000:]
    assert "verified with no error" in right.stderr + right.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_ckpt_export_torchscript_equals_eager(name, tmp_path):
    from monai.bundle import ckpt_export

    bundle = _copy_bundle(name, tmp_path)
    if name == "seqinv_pretrain":
        weights = _tiny_encoder_weights(bundle)
        net_id, config = "encoder_def", "train.yaml"
        eager = PooledEncoder(1, TINY["encoder_features"], 0.0)
        load_encoder_weights(eager, weights)
    else:
        weights = _tiny_downstream_weights(bundle, name)
        net_id, config = "network", "inference.yaml"
        eager = load_trained(weights)[0]
    scripted_path = bundle / "models" / "model.ts"
    ckpt_export(
        net_id=net_id,
        filepath=str(scripted_path),
        ckpt_file=str(weights),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / config),
        bundle_root=str(bundle),
    )
    scripted = torch.jit.load(str(scripted_path), map_location="cpu").eval()
    x = torch.rand(1, 1, 32, 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = eager.eval()(x), scripted(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- packaging


@pytest.fixture()
def tiny_ixi_bundle(tmp_path):
    bundle = _copy_bundle("ixi_tissue_seg", tmp_path / "src")
    _tiny_downstream_weights(bundle, "ixi_tissue_seg")
    return bundle


def test_packaging_is_byte_identical_and_holds_bundle_and_custom(tiny_ixi_bundle, tmp_path):
    first = package_bundle(tiny_ixi_bundle, tmp_path / "dist1")
    os.utime(tiny_ixi_bundle / "configs" / "inference.yaml", (1e9, 1e9))  # file times must not matter
    second = package_bundle(tiny_ixi_bundle, tmp_path / "dist2")
    assert first.zip_path.name == "ixi_tissue_seg_v0.1.0.zip"
    assert first.zip_path.read_bytes() == second.zip_path.read_bytes()
    assert first.sha256 == second.sha256 == sha256_of(first.zip_path)
    names = zipfile.ZipFile(first.zip_path).namelist()
    for expected in (
        "ixi_tissue_seg/configs/inference.yaml",
        "ixi_tissue_seg/configs/metadata.json",
        "ixi_tissue_seg/docs/README.md",
        "ixi_tissue_seg/LICENSE",
        "ixi_tissue_seg/models/model.pt",
        "ixi_tissue_seg/models/model.json",
        "ixi_tissue_seg/custom/__init__.py",
        "ixi_tissue_seg/custom/segmentation.py",
        "ixi_tissue_seg/custom/schemas/bundle_metadata.schema.json",
    ):
        assert expected in names
    assert not any("__pycache__" in n or n.endswith(".pyc") or "/runs/" in n for n in names)
    info = json.loads((tmp_path / "dist1" / "model_info.json").read_text())
    assert info["ixi_tissue_seg_v0.1.0"]["sha256"] == first.sha256
    assert info["ixi_tissue_seg_v0.1.0"]["weights"] == "embedded"


def test_packaging_refuses_changed_content_under_a_released_version(tiny_ixi_bundle, tmp_path):
    dist = tmp_path / "dist"
    package_bundle(tiny_ixi_bundle, dist)
    package_bundle(tiny_ixi_bundle, dist)  # same content again: fine
    docs = tiny_ixi_bundle / "docs" / "README.md"
    docs.write_text(docs.read_text() + "\nchanged\n")
    with pytest.raises(InputError, match="already released .* Bump `version`"):
        package_bundle(tiny_ixi_bundle, dist)
    metadata_path = tiny_ixi_bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["version"] = "0.1.1"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(InputError, match="no entry for version '0.1.1'"):
        package_bundle(tiny_ixi_bundle, dist)
    metadata["changelog"]["0.1.1"] = "docs changed"
    metadata_path.write_text(json.dumps(metadata))
    result = package_bundle(tiny_ixi_bundle, dist)
    assert result.zip_path.name == "ixi_tissue_seg_v0.1.1.zip"
    assert set(json.loads((dist / "model_info.json").read_text())) == {"ixi_tissue_seg_v0.1.0", "ixi_tissue_seg_v0.1.1"}


def test_packaging_refuses_missing_weights_and_can_keep_them_outside(tmp_path):
    bundle = _copy_bundle("ixi_tissue_seg", tmp_path / "src")
    with pytest.raises(InputError, match="no trained weights"):
        package_bundle(bundle, tmp_path / "dist")
    weights = _tiny_downstream_weights(bundle, "ixi_tissue_seg")
    result = package_bundle(bundle, tmp_path / "dist", weights_url="https://example.org/releases/{name}")
    archive = zipfile.ZipFile(result.zip_path)
    assert "ixi_tissue_seg/models/model.pt" not in archive.namelist()
    large_files = archive.read("ixi_tissue_seg/large_files.yml").decode()
    assert f'hash_val: "{sha256_of(weights)}"' in large_files
    assert 'url: "https://example.org/releases/model.pt"' in large_files
    assert result.weights == "external"


@pytest.mark.slow
def test_download_with_monai_and_run_inference_without_the_repository(tiny_ixi_bundle, tmp_path):
    result = package_bundle(tiny_ixi_bundle, tmp_path / "dist")
    downloads = tmp_path / "downloads"
    download = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "download", "--name", "ixi_tissue_seg",
         "--url", result.zip_path.as_uri(), "--bundle_dir", str(downloads)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr[-2000:]
    bundle = downloads / "ixi_tissue_seg"
    assert (bundle / "configs" / "inference.yaml").is_file() and (bundle / "custom" / "inference.py").is_file()
    verify_bundle_zip(downloads / "ixi_tissue_seg.zip", tmp_path / "dist" / "model_info.json")

    scan = _write_scan(tmp_path / "scan.nii.gz")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REPO, str(REPO), "run",
         "--config_file", str(bundle / "configs" / "inference.yaml"),
         "--image", str(scan), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    output = nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    source = nib.load(scan)
    assert output.shape == source.shape
    np.testing.assert_allclose(output.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(output.dataobj))) <= {0, 1, 2, 3}


def test_the_without_repository_runner_really_hides_custom(tmp_path):
    """The check above is only meaningful if `custom` cannot be imported from the repository in that subprocess."""
    probe = subprocess.run(
        [sys.executable, "-c", _WITHOUT_REPO, str(REPO), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert "custom is still importable" not in probe.stderr + probe.stdout
    plain = subprocess.run([sys.executable, "-c", "import custom"], capture_output=True, cwd=tmp_path)
    assert plain.returncode == 0  # whereas a plain interpreter of this environment does import it


def test_tampered_download_is_refused_before_extraction(tiny_ixi_bundle, tmp_path):
    result = package_bundle(tiny_ixi_bundle, tmp_path / "dist")
    model_info = tmp_path / "dist" / "model_info.json"
    tampered = tmp_path / "ixi_tissue_seg.zip"
    payload = bytearray(result.zip_path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    tampered.write_bytes(bytes(payload))
    with pytest.raises(InputError, match="sha256 .* does not match .* do not run its configs"):
        verify_bundle_zip(tampered, model_info, name="ixi_tissue_seg", version="0.1.0")
    target = tmp_path / "installed"
    with pytest.raises(InputError, match="does not match"):
        fetch_bundle("ixi_tissue_seg", tampered.as_uri(), target, model_info)
    assert not (target / "ixi_tissue_seg").exists()
    fetch_bundle("ixi_tissue_seg", result.zip_path.as_uri(), target, model_info)  # the genuine file installs
    assert (target / "ixi_tissue_seg" / "configs" / "inference.yaml").is_file()


def test_cli_verify_reports_a_mismatch_in_one_line(tiny_ixi_bundle, tmp_path):
    from custom.cli import main

    result = package_bundle(tiny_ixi_bundle, tmp_path / "dist")
    other = tmp_path / "ixi_tissue_seg.zip"
    shutil.copy(result.zip_path, other)
    with open(other, "ab") as handle:
        handle.write(b"x")
    assert main(["verify", str(other), "--model_info", str(tmp_path / "dist" / "model_info.json")]) == 2
    assert main(["verify", str(result.zip_path), "--model_info", str(tmp_path / "dist" / "model_info.json")]) == 0


# ------------------------------------------------------------------------------------------- bundle chaining


def test_downstream_encoder_from_a_pretrain_bundle_zip_or_download_folder(tmp_path):
    bundle = _copy_bundle("seqinv_pretrain", tmp_path / "src")
    weights = _tiny_encoder_weights(bundle)
    result = package_bundle(bundle, tmp_path / "dist")
    expected = torch.load(weights, weights_only=True)

    def load(source) -> FrozenEncoderUNet:
        net = FrozenEncoderUNet(
            1, 4, TINY["encoder_features"], TINY["decoder_features"], 0.0, pretrained_encoder=source
        )
        assert net.loaded_encoder_tensors == len(expected)
        return net

    from_zip = load(result.zip_path)
    for key, value in expected.items():
        torch.testing.assert_close(from_zip.encoder.state_dict()[key], value)
    extracted = tmp_path / "downloaded"
    zipfile.ZipFile(result.zip_path).extractall(extracted)
    load(extracted / "seqinv_pretrain")  # the bundle folder
    load(extracted)  # the --bundle_dir a download went into
    not_a_zip = tmp_path / "broken.zip"
    not_a_zip.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.zip: not a valid zip"):
        load(not_a_zip)

"""Model Zoo-style distribution: metadata against the project's and MONAI's official schema, verify_net_in_out and
ckpt_export (TorchScript parity) on each inference config's network_def, the files the Model Zoo asks for,
deterministic packaging, download with MONAI's own `download --url file://`, every config (inference, evaluate,
training; command line and Python API) of a downloaded zip run where the repository's `custom` cannot be imported,
declared packages, no import side effects, sha256 refusal, and encoder chaining from a bundle zip."""

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
#: MONAI's official metadata schema (source in tests/data/README.md).
OFFICIAL_SCHEMA = Path(__file__).resolve().parent / "data" / "meta_schema_20240725.json"
OFFICIAL_SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"
#: Encoder / decoder widths of the shipped CPU demo weights (the cpu_small.yaml files).
DEMO_ENCODER = [8, 16, 32, 64, 96]
DEMO_DECODER = [96, 64, 48, 32, 24, 16]
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


def _demo_downstream_weights(bundle: Path, name: str) -> Path:
    """Seeded random weights of the CPU demo widths (what `make weights` ships) and their model.json."""
    task, channels = DOWNSTREAM[name]
    settings = DownstreamSettings(
        task=task,
        out_channels=channels,
        encoder_features=DEMO_ENCODER,
        decoder_features=DEMO_DECODER,
        dropout=0.0,
        pixdim=[2.0, 2.0, 2.0],
        patch_size=[48, 48, 48],
        normalize="zscore" if task == "regression" else "percentile",
    )
    torch.manual_seed(0)
    weights = bundle / "models" / "model.pt"
    torch.save(build_network(settings).state_dict(), weights)
    weights.with_suffix(".json").write_text(json.dumps(settings.to_dict()))
    return weights


def _demo_encoder_weights(bundle: Path) -> Path:
    torch.manual_seed(0)
    weights = bundle / "models" / "model.pt"
    torch.save(Encoder(features=DEMO_ENCODER, dropout=0.0).state_dict(), weights)
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


@pytest.mark.parametrize("name", BUNDLES)
def test_every_bundle_metadata_follows_the_official_schema(name, tmp_path):
    """MONAI's own meta_schema_20240725.json (offline copy), through jsonschema and through MONAI's verify_metadata
    (which finds the schema already at its filepath, as the Model Zoo's prepare_schema.py leaves it)."""
    import jsonschema
    from monai.bundle import verify_metadata

    metadata_file = REPO / "bundles" / name / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    assert metadata["schema"].endswith("/meta_schema_20240725.json")
    jsonschema.validate(metadata, json.loads(OFFICIAL_SCHEMA.read_text()))
    schema_copy = tmp_path / "eval" / "schema.json"
    schema_copy.parent.mkdir()
    shutil.copy(OFFICIAL_SCHEMA, schema_copy)
    verify_metadata(
        meta_file=str(metadata_file), filepath=str(schema_copy), hash_val=OFFICIAL_SCHEMA_SHA256, hash_type="sha256"
    )


def test_official_schema_copy_is_the_recorded_one():
    assert sha256_of(OFFICIAL_SCHEMA) == OFFICIAL_SCHEMA_SHA256


def test_project_schema_is_stricter_than_the_official_one():
    from custom.bundle_check import load_schema

    official, project = json.loads(OFFICIAL_SCHEMA.read_text()), load_schema()
    assert set(official["required"]) <= set(project["required"])
    assert set(official["$defs"]["tensor"]["required"]) <= set(project["$defs"]["tensor"]["required"])
    metadata = json.loads((REPO / "bundles/arc_lesion_seg/configs/metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"]["format"] = "segmentation"  # but 2 channels
    metadata["eval_metrics"] = {"mean_dice": "see docs"}
    metadata["network_data_format"]["inputs"]["image"]["value_range"] = [0]
    problems = "\n".join(metadata_problems(metadata))
    assert "outputs/pred/num_channels: 1 was expected" in problems
    assert "eval_metrics/mean_dice: 'see docs' is not of type 'number'" in problems
    assert "inputs/image/value_range" in problems


def test_metadata_describes_the_shipped_networks():
    """Channel counts, spatial shapes and output formats as the networks and the specification have them."""
    for name in BUNDLES:
        metadata = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
        fmt = metadata["network_data_format"]
        assert fmt["inputs"]["image"]["spatial_shape"] == ["32*n"] * 3  # 16^3 leaves one voxel for instance norm
        assert all(isinstance(v, (int, float)) for v in metadata["eval_metrics"].values())
        assert (REPO / "bundles" / name / "docs" / "data_license.txt").is_file()
        if name in DOWNSTREAM:
            task, channels = DOWNSTREAM[name]
            assert fmt["outputs"]["pred"]["num_channels"] == channels
            assert fmt["outputs"]["pred"]["format"] == ("labels" if task == "segmentation" else "noise")
            assert fmt["post_processed_outputs"]["pred"]["num_channels"] == 1
    pretrain = json.loads((REPO / "bundles/seqinv_pretrain/configs/metadata.json").read_text())
    assert pretrain["network_data_format"]["outputs"]["pred"]["num_channels"] == DEMO_ENCODER[-1]
    arc = json.loads((REPO / "bundles/arc_lesion_seg/configs/metadata.json").read_text())
    text = " ".join(str(arc[k]) for k in ("task", "description", "changelog", "data_source", "pred_classes"))
    assert "lesion" in text and "Aphasia Recovery Cohort" in arc["data_source"]
    assert "grey matter" not in text and "IXI" not in text + " ".join(arc["references"])
    assert arc["label_classes"].startswith("single-channel lesion mask")


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


def _inference_network_bundle(name: str, dest: Path, weights: str = "demo") -> Path:
    """A copy of the bundle with weights as verify_bundle.py sees them: ``demo`` (random, CPU demo widths), ``tiny``
    (random, TINY widths) or ``none`` (the pretraining bundle only: no model.pt yet)."""
    bundle = _copy_bundle(name, dest)
    if weights == "demo":
        _demo_encoder_weights(bundle) if name == "seqinv_pretrain" else _demo_downstream_weights(bundle, name)
    elif weights == "tiny":
        _tiny_encoder_weights(bundle) if name == "seqinv_pretrain" else _tiny_downstream_weights(bundle, name)
    return bundle


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_verify_net_in_out_on_the_inference_network_def(name, tmp_path):
    """As the Model Zoo's verify_bundle.py calls it: network_def of configs/inference.yaml, n=1 (32^3), demo widths."""
    from monai.bundle import verify_net_in_out

    bundle = _inference_network_bundle(name, tmp_path)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.yaml"),
        device="cpu",
        bundle_root=str(bundle),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in BUNDLES if n != "seqinv_pretrain"])
def test_verify_net_in_out_on_the_training_network(name, tmp_path):
    """The training network of a fresh clone (paper widths, random encoder) fits the metadata too."""
    from monai.bundle import verify_net_in_out

    bundle = _copy_bundle(name, tmp_path)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "train.yaml"),
        device="cpu",
        n=2,  # spatial shape 32*n = 64^3
        bundle_root=str(bundle),
        pretrained_encoder="random",
    )


def test_pretrain_inference_network_def_without_weights_has_the_demo_widths(tmp_path):
    """A fresh clone (no model.pt) still builds network_def, with the widths metadata.json describes."""
    from monai.bundle import ConfigParser

    bundle = _inference_network_bundle("seqinv_pretrain", tmp_path, weights="none")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    assert parser.get_parsed_content("network_def").features == tuple(DEMO_ENCODER)


def test_verify_net_in_out_command_line_catches_a_wrong_channel_count(tmp_path):
    """The `python -m monai.bundle verify_net_in_out` command itself, and that it fails on wrong metadata."""
    bundle = _copy_bundle("seqinv_pretrain", tmp_path)
    _tiny_encoder_weights(bundle)  # 16 output features, metadata says 96 (the demo weights)
    cmd = [
        sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--config_file", str(bundle / "configs" / "inference.yaml"), "--device", "cpu", "--n", "2",
    ]  # fmt: skip
    wrong = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert wrong.returncode != 0 and "doesn't match: `96`" in wrong.stderr
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
    """ckpt_export of each inference config's network_def (as verify_bundle.py runs it), TorchScript = eager."""
    from monai.bundle import ckpt_export

    bundle = _inference_network_bundle(name, tmp_path, weights="tiny")
    weights = bundle / "models" / "model.pt"
    if name == "seqinv_pretrain":
        eager = PooledEncoder(1, TINY["encoder_features"], 0.0)
        load_encoder_weights(eager, weights)
    else:
        eager = load_trained(weights)[0]
    scripted_path = bundle / "models" / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(scripted_path),
        ckpt_file=str(weights),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.yaml"),
        bundle_root=str(bundle),
    )
    scripted = torch.jit.load(str(scripted_path), map_location="cpu").eval()
    x = torch.rand(1, 1, 32, 48, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = eager.eval()(x), scripted(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_inference_checkpoint_loader_is_strict(tmp_path):
    """The inference configs load model.pt with a strict CheckpointLoader: weights of another network are refused."""
    from monai.bundle import ConfigWorkflow

    bundle = _inference_network_bundle("ixi_tissue_seg", tmp_path, weights="tiny")
    weights = bundle / "models" / "model.pt"
    state = torch.load(weights, weights_only=True)
    state.pop(sorted(k for k in state if k.startswith("head."))[0])  # one tensor missing
    torch.save(state, weights)
    scan = _write_scan(tmp_path / "scan.nii.gz")
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.yaml"),
        workflow_type="inference",
        bundle_root=str(bundle),
        image=str(scan),
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    handlers = workflow.parser.get_parsed_content("handlers")
    assert handlers[0].strict
    with pytest.raises(Exception) as info:
        workflow.run()
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("Missing key" in message for message in chain), chain


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


# --------------------------------------------------------------- a downloaded bundle, without the repository

# MONAI's Python API on a downloaded bundle where the repository's `custom` cannot be imported. As MONAI's own
# `run` does (and the Model Zoo's tests), the caller puts the bundle folder first on sys.path so its bundled
# custom/ is the one imported; ConfigWorkflow / create_workflow, check_properties, run. It also checks that none
# of this replaced the caller's sys.excepthook.
_PYTHON_API_WITHOUT_REPO = """
import json, os, sys
repo, bundle, config, kind, api, overrides = sys.argv[1:7]
repo = os.path.realpath(repo)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()
                    and "editable" not in type(f).__name__.lower()]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != repo]
sys.path.insert(0, bundle)
hook = sys.excepthook
import custom
assert os.path.realpath(custom.__file__).startswith(os.path.realpath(bundle)), custom.__file__
from monai.bundle import ConfigWorkflow, create_workflow
config_file = os.path.join(bundle, "configs", config)
args = dict(workflow_type=kind, **json.loads(overrides))
if api == "ConfigWorkflow":
    workflow = ConfigWorkflow(config_file=config_file, **args)
    workflow.initialize()
else:
    workflow = create_workflow(config_file=config_file, **args)
missing = workflow.check_properties()
assert not missing, missing
workflow.run()
workflow.finalize()
assert sys.excepthook is hook, "the bundle replaced sys.excepthook"
print("python api ok")
"""


def _cli_overrides(values: dict) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return args


def _run_without_repo(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_REPO, str(REPO), *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, synthetic_dataset):
    """Every bundle packaged with `seqinv package` (TINY random weights) and unpacked into one folder, tiny
    synthetic data, a scan, and a working directory that is neither the repository nor a bundle."""
    root = tmp_path_factory.mktemp("zoo")
    for name in BUNDLES:
        bundle = _copy_bundle(name, root / "src")
        _tiny_encoder_weights(bundle) if name == "seqinv_pretrain" else _tiny_downstream_weights(bundle, name)
        result = package_bundle(bundle, root / "dist")
        zipfile.ZipFile(result.zip_path).extractall(root / "models")
    work = root / "elsewhere"
    work.mkdir()
    return {
        "models": root / "models",
        "data": synthetic_dataset(subjects=9),  # session-wide, read only
        "scan": _write_scan(root / "scan.nii.gz"),
        "work": work,
    }


def _tiny_downstream_overrides(data: Path, out: Path) -> dict:
    return {
        **TINY,
        "max_epochs": 1,
        "dataset_dir": str(data),
        "output_dir": str(out),
        "model_path": str(out / "model.pt"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLES)
def test_downloaded_inference_config_runs_without_the_repository(downloaded, name):
    bundle, out = downloaded["models"] / name, downloaded["work"] / f"infer_{name}"
    done = _run_without_repo(
        downloaded["work"], "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
        "--image", str(downloaded["scan"]), "--output_dir", str(out),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    if name == "seqinv_pretrain":
        features = np.load(out / "scan_features.npy")
        assert features.shape == (TINY["encoder_features"][-1],) and np.isfinite(features).all()
        assert (out / "features.csv").read_text().startswith("input,h0,")
    else:
        postfix = {"ixi_tissue_seg": "seg", "arc_lesion_seg": "lesion", "ixi_denoise": "denoised"}[name]
        written = nib.load(out / f"scan_{postfix}.nii.gz")
        assert written.shape == nib.load(downloaded["scan"]).shape
    if name == "arc_lesion_seg":  # its lesion table uses custom.evaluation (and tqdm) after the mask is written
        assert (out / "lesion_volumes.csv").read_text().startswith("input,output,lesion_volume_ml")


@pytest.mark.slow
def test_downloaded_training_and_evaluation_configs_run_without_the_repository(downloaded):
    """Training (every config with a former `initialize` section) and evaluation from the unpacked zips, on the
    command line from another folder; the downstream bundle takes the unpacked pretraining bundle as its encoder."""
    models, data, work = downloaded["models"], downloaded["data"], downloaded["work"]
    pretrain = models / "seqinv_pretrain"
    overrides = {
        "dataset_dir": str(data / "qmri"), "output_dir": str(work / "pretrain"),
        "encoder_weights": str(work / "pretrain" / "model.pt"), "patch_size": [32, 32, 32], "batch_size": 2,
        "encoder_features": TINY["encoder_features"], "projection_hidden": 16, "projection_dim": 8,
        "recon_features": [8, 8, 4, 4], "max_epochs": 1, "iterations_per_epoch": 1, "num_workers": 0,
        "val_fraction": 0.0,
    }  # fmt: skip
    done = _run_without_repo(
        work, "run", "training", "--config_file", str(pretrain / "configs" / "train.yaml"), *_cli_overrides(overrides)
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (work / "pretrain" / "model.pt").is_file()

    ixi = models / "ixi_tissue_seg"
    out = work / "ixi_train"
    done = _run_without_repo(
        work, "run", "training", "--config_file", str(ixi / "configs" / "train.yaml"),
        "--pretrained_encoder", str(pretrain), *_cli_overrides(_tiny_downstream_overrides(data / "ixi", out)),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (out / "model.pt").is_file() and (out / "model.json").is_file()
    for name, model in (("ixi_tissue_seg", out / "model.pt"), ("ixi_denoise", models / "ixi_denoise/models/model.pt")):
        evaluation = work / f"eval_{name}"
        done = _run_without_repo(
            work, "run", "evaluating", "--config_file", str(models / name / "configs" / "evaluate.yaml"),
            "--dataset_dir", str(data / "ixi"), "--model_path", str(model), "--output_dir", str(evaluation),
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert (evaluation / "metrics.csv").is_file()


@pytest.mark.slow
def test_downloaded_bundle_through_the_python_api(downloaded):
    """MONAI's Python API with check_properties on the unpacked zips: ConfigWorkflow (training, inference) and
    create_workflow (inference), each in a process where the repository's custom cannot be imported."""
    models, data, work = downloaded["models"], downloaded["data"], downloaded["work"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = work / "api"
    jobs = [
        ("arc_lesion_seg", "train.yaml", "train", "ConfigWorkflow",
         {**_tiny_downstream_overrides(data / "arc", out / "train"), "pretrained_encoder": "random",
          "run_id": "training"}),
        ("arc_lesion_seg", "inference.yaml", "inference", "create_workflow",
         {"image": str(downloaded["scan"]), "output_dir": str(out / "infer")}),
        ("seqinv_pretrain", "inference.yaml", "inference", "ConfigWorkflow",
         {"image": str(downloaded["scan"]), "output_dir": str(out / "features")}),
    ]  # fmt: skip
    for name, config, kind, api, overrides in jobs:
        bundle = models / name
        done = subprocess.run(
            [sys.executable, "-c", _PYTHON_API_WITHOUT_REPO, str(REPO), str(bundle), config, kind, api,
             json.dumps({"bundle_root": str(bundle), **overrides})],
            capture_output=True, text=True, timeout=600, cwd=work, env=env,
        )  # fmt: skip
        assert done.returncode == 0 and "python api ok" in done.stdout, (done.stdout + done.stderr)[-3000:]
    assert (out / "train" / "model.pt").is_file() and (out / "infer" / "scan_lesion.nii.gz").is_file()
    assert (out / "features" / "scan_features.npy").is_file()


def test_packaged_bundle_has_the_files_the_model_zoo_asks_for(tmp_path):
    """verify_bundle.py's directory check (LICENSE, configs/metadata.json, models/model.pt, configs/inference.*)
    and the data licence file of the Model Zoo's contributing guide, in every zip."""
    for name in BUNDLES:
        bundle = _inference_network_bundle(name, tmp_path / "src", weights="tiny")
        names = set(zipfile.ZipFile(package_bundle(bundle, tmp_path / "dist").zip_path).namelist())
        for required in ("LICENSE", "configs/metadata.json", "models/model.pt", "configs/inference.yaml",
                         "docs/README.md", "docs/data_license.txt"):  # fmt: skip
            assert f"{name}/{required}" in names, (name, required)


def _module_imports(path: Path) -> set[str]:
    """Top-level names of every import statement in a Python file (also those inside functions)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _custom_modules_of(bundle: Path) -> set[str]:
    """The custom modules a bundle's configs use, with every custom module those import (transitively)."""
    import ast
    import re

    text = "\n".join(p.read_text() for p in (bundle / "configs").glob("*.yaml"))
    pending = set(re.findall(r"\bcustom(?:\.[a-z_]+)+", text)) | {"custom"}
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        parts = name.split(".")
        while parts and not ((REPO / Path(*parts)).with_suffix(".py").is_file() or (REPO / Path(*parts)).is_dir()):
            parts.pop()  # custom.segmentation.build_network -> custom.segmentation
        if not parts or ".".join(parts) in seen:
            continue
        module = ".".join(parts)
        seen.add(module)
        path = (REPO / Path(*parts)).with_suffix(".py")
        path = path if path.is_file() else REPO / Path(*parts) / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("custom"):
                pending.add(node.module)
                pending |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                pending |= {a.name for a in node.names if a.name.startswith("custom")}
    return seen


@pytest.mark.parametrize("name", BUNDLES)
def test_every_package_the_bundle_imports_is_declared(name):
    """Each third-party package that the custom/ modules used by a bundle's configs import (plus PyYAML, which MONAI
    needs to read YAML configs, and what the configs' handlers need) is in required_packages_version, so a clean
    environment built from the metadata runs every config."""
    import importlib.metadata

    bundle = REPO / "bundles" / name
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    declared = {k.lower() for k in metadata["required_packages_version"]} | {"monai", "torch", "numpy"}
    imported: set[str] = set()
    for module in _custom_modules_of(bundle):
        path = (REPO / Path(*module.split("."))).with_suffix(".py")
        imported |= _module_imports(path if path.is_file() else REPO / Path(*module.split(".")) / "__init__.py")
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in ("custom", "__future__")}
    distributions = importlib.metadata.packages_distributions()
    needed = {distributions.get(m, [m])[0].lower() for m in third_party}
    needed |= {"pyyaml", "tensorboard"}  # YAML configs; TensorBoardStatsHandler of train.yaml
    assert needed <= declared, f"{name}: undeclared {sorted(needed - declared)}"
    installed = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}
    for package in metadata["required_packages_version"]:
        assert package.lower() in installed, f"{name}: {package} is declared but not installed here"


def test_importing_custom_has_no_process_wide_side_effect(tmp_path):
    code = (
        "import sys\nhook = sys.excepthook\n"
        "import custom, custom.inference, custom.segmentation, custom.features, custom.errors\n"
        "assert sys.excepthook is hook, 'import replaced sys.excepthook'\n"
        "assert custom.errors.report_input_errors() is False and sys.excepthook is hook\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]


def test_inference_without_an_input_names_the_options_not_a_path(tmp_path, monkeypatch):
    from custom.inference import inference_inputs

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as info:
        inference_inputs(demo="data/synthetic/ixi/IXI-T1")
    assert "--image" in str(info.value) and "--dataset_dir" in str(info.value)
    assert "data/synthetic" not in str(info.value)
    demo = tmp_path / "data" / "synthetic" / "ixi" / "IXI-T1"
    demo.mkdir(parents=True)
    scan = _write_scan(demo / "a.nii.gz")
    assert inference_inputs(demo="data/synthetic/ixi/IXI-T1") == [Path("data/synthetic/ixi/IXI-T1/a.nii.gz")]
    assert inference_inputs(image=scan) == [scan]


def test_missing_weights_name_the_model_path_option(tmp_path):
    from custom.segmentation import load_settings

    with pytest.raises(InputError, match="--model_path") as info:
        load_settings(tmp_path / "model.pt")
    assert "--model " not in str(info.value)


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

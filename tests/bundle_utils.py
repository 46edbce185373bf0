"""Shared helpers of the downstream bundle tests: tiny settings, synthetic data, running configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]

# tiny downstream settings: 6 mm synthetic volumes, 32^3 windows, a 5-level encoder of widths 4..16
TINY = {
    "pixdim": [6.0, 6.0, 6.0],
    "patch_size": [32, 32, 32],
    "encoder_features": [4, 8, 8, 16, 16],
    "decoder_features": [16, 16, 8, 8, 4, 4],
    "batch_size": 1,
    "num_workers": 0,
    "max_epochs": 2,
    "val_interval": 1,
}


def save_tiny_encoder(tmp_path_factory) -> Path:
    """A seeded random encoder of the :data:`TINY` widths, saved as an encoder-only state dict."""
    import torch

    from custom.networks import Encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.pt"
    torch.save(Encoder(features=TINY["encoder_features"]).state_dict(), path)
    return path


def assert_encoder_unchanged(encoder_file: Path, model_file: Path) -> None:
    """Every encoder tensor saved in a trained downstream ``model.pt`` equals the pretrained one; a decoder exists."""
    import torch

    original = torch.load(encoder_file, weights_only=True)
    saved = torch.load(model_file, weights_only=True)
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    assert len(encoder_keys) == len(original)
    for key, value in original.items():
        assert torch.equal(saved[f"encoder.{key}"], value), f"encoder tensor {key} changed during training"
    decoder = [k for k in saved if not k.startswith("encoder.")]
    assert decoder, "no decoder weights saved"


def run_config(bundle: Path, config: str, run_id: str, workflow_type: str, **overrides) -> ConfigWorkflow:
    """Initialise, check and run one bundle config through MONAI's ConfigWorkflow."""
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / config),
        workflow_type=workflow_type,
        run_id=run_id,
        bundle_root=str(bundle),
        **overrides,
    )
    workflow.initialize()
    if workflow_type == "train":
        assert workflow.check_properties() in (None, [])
    workflow.run()
    return workflow


def train_tiny(bundle: Path, dataset_dir: Path, out: Path, **overrides) -> Path:
    """Train a bundle with :data:`TINY` settings; returns the output folder (model.pt, model.json inside)."""
    settings = {**TINY, **overrides}
    run_config(
        bundle,
        "train.yaml",
        "training",
        "train",
        dataset_dir=str(dataset_dir),
        output_dir=str(out),
        model_path=str(out / "model.pt"),
        **settings,
    )
    return out


def run_inference(bundle: Path, model: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file <bundle>/configs/inference.yaml ...`` in a subprocess."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.yaml"),
        "--model_path", str(model), "--output_dir", str(out), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)

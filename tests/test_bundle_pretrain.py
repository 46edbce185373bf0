"""End-to-end tests of bundles/seqinv_pretrain through monai.bundle itself (tiny sizes, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom.networks import Encoder, load_encoder_weights

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "seqinv_pretrain"
TRAIN = str(BUNDLE / "configs" / "train.yaml")
TINY_FEATURES = [4, 8, 8, 16, 16]


@pytest.fixture(scope="module")
def qmri_dir(synthetic_dataset) -> Path:
    return synthetic_dataset(subjects=3, seed=0, resolution=6.0) / "qmri"


def tiny_overrides(qmri_dir: Path, out: Path, **extra) -> dict:
    overrides = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(qmri_dir),
        "output_dir": str(out),
        "encoder_weights": str(out / "model.pt"),
        "patch_size": [32, 32, 32],
        "batch_size": 2,
        "encoder_features": TINY_FEATURES,
        "projection_hidden": 16,
        "projection_dim": 8,
        "recon_features": [8, 8, 4, 4],
        "max_epochs": 1,
        "iterations_per_epoch": 2,
        "num_workers": 0,
        "checkpoint_interval": 1,
        "val_fraction": 0.0,
    }
    overrides.update(extra)
    return overrides


def run_workflow(**overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=TRAIN, workflow_type="train", run_id="training", **overrides)
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()
    return workflow


@pytest.mark.parametrize("mode", ["seqinv", "seqaug", "base"])
def test_training_runs_and_exports_encoder(qmri_dir, tmp_path, mode):
    run_workflow(**tiny_overrides(qmri_dir, tmp_path, mode=mode))
    weights = tmp_path / "model.pt"
    assert weights.is_file()
    state = torch.load(weights, weights_only=True)
    assert state and all(not k.startswith(("encoder.", "projector.", "reconstructor.")) for k in state)
    assert load_encoder_weights(Encoder(features=TINY_FEATURES), weights) == len(state)
    assert (tmp_path / "checkpoints" / "checkpoint.pt").is_file()
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard log"
    assert list((tmp_path / "snapshots").glob("epoch_*.png")), "no snapshot PNG"


def test_paper_config_defaults():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(TRAIN)
    assert parser["mode"] == "seqinv" and parser["patch_size"] == [96, 96, 96]
    assert parser["batch_size"] == 8 and parser["temperature"] == 0.5
    assert parser["encoder_features"] == [64, 128, 256, 512, 768] and parser["dropout"] == 0.2
    assert parser["grad_clip"] == 12.0


def test_resume_restores_epoch_optimizer_and_scheduler(qmri_dir, tmp_path):
    first = run_workflow(**tiny_overrides(qmri_dir, tmp_path, max_epochs=2, iterations_per_epoch=1))
    trainer = first.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert saved["trainer"]["iteration"] == 2 and saved["lr_scheduler"]["last_epoch"] == 2
    assert saved["optimizer"]["state"], "optimizer moments missing from the checkpoint"

    # the same command with a longer schedule continues from epoch 2 instead of starting again
    second = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        run_id="training",
        **tiny_overrides(qmri_dir, tmp_path, max_epochs=3, iterations_per_epoch=1),
    )
    second.initialize()
    trainer2 = second.parser.get_parsed_content("train#trainer")
    optimizer2 = second.parser.get_parsed_content("optimizer")
    seen_epochs = []
    from ignite.engine import Events

    seen_lr = []
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_epochs.append(e.state.epoch))
    trainer2.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_lr.append(optimizer2.param_groups[0]["lr"]))
    second.run()
    assert seen_epochs == [3], f"resumed run trained epochs {seen_epochs}, expected only epoch 3"
    # the longer schedule applies: epoch 3 of 3 runs at lr * (1 - 2/3)^0.9, not at the finished run's 0
    base_lr = second.parser.get_parsed_content("learning_rate")
    assert seen_lr[0] == pytest.approx(base_lr * (1 - 2 / 3) ** 0.9, rel=1e-6)
    assert trainer2.state.iteration == 3
    assert optimizer2.state_dict()["state"], "optimizer state not restored"


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(qmri_dir, tmp_path):
    """Start training in a subprocess, kill it (SIGKILL) after a checkpoint, start it again: it resumes."""
    overrides = tiny_overrides(qmri_dir, tmp_path, max_epochs=2, iterations_per_epoch=40)
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if isinstance(value, list) else str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ckpt = tmp_path / "checkpoints" / "checkpoint.pt"
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert ckpt.is_file(), "no checkpoint was written before the deadline"
        time.sleep(2.0)  # let a few more iterations (and checkpoints) happen
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = torch.load(ckpt, weights_only=False)
    iteration_at_kill = saved["trainer"]["iteration"]
    assert 0 < iteration_at_kill < 80

    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert f"iteration {iteration_at_kill}" in log and "resumed from" in log, log[-3000:]
    final = torch.load(ckpt, weights_only=False)
    assert final["trainer"]["iteration"] == 80


def test_bad_mode_is_a_clear_error(qmri_dir, tmp_path):
    from custom.errors import InputError, find_input_error

    with pytest.raises(Exception) as info:
        run_workflow(**tiny_overrides(qmri_dir, tmp_path, mode="simclr"))
    err = find_input_error(info.value)
    assert isinstance(err, InputError) and "mode must be one of" in str(err)


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    configs = f"['{TRAIN}','{BUNDLE / 'configs' / 'cpu_small.yaml'}']"
    args = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"qMRI dataset folder {tmp_path / 'nowhere'} is missing" in done.stderr
    assert "Traceback" not in done.stderr


def test_subject_missing_a_map_is_a_clear_error(qmri_dir, tmp_path):
    import shutil

    from custom.data.qmri_datalist import QMRIDatasetError, find_qmri_subjects

    broken = tmp_path / "qmri"
    shutil.copytree(qmri_dir, broken)
    victim = sorted(broken.glob("sub-*/*_R1.nii.gz"))[0]
    victim.unlink()
    with pytest.raises(QMRIDatasetError, match=r"missing the R1 map"):
        find_qmri_subjects(broken)


def test_patch_larger_than_image_is_padded(qmri_dir, tmp_path):
    # 6 mm synthetic volumes are about 33 x 39 x 32 voxels: a 48^3 patch must be padded, not crash
    run_workflow(**tiny_overrides(qmri_dir, tmp_path, patch_size=[48, 48, 48], iterations_per_epoch=1))
    assert (tmp_path / "model.pt").is_file()


def test_paper_command_starts_and_reports_memory_clearly(tmp_path):
    """The paper command with no other argument: on a machine with the memory it trains; on a small CPU machine
    it stops at once with one clear line (not an out-of-memory kill)."""
    from custom.engines import _available_memory_gib, estimated_step_memory_gib

    if torch.cuda.is_available() or (_available_memory_gib() or 0) * 0.9 > estimated_step_memory_gib(
        8, [96, 96, 96], [64, 128, 256, 512, 768]
    ):
        pytest.skip("enough memory for a paper-size step here: covered by the GPU / large-memory runs")
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "GiB on the CPU" in done.stderr and "cpu_small.yaml" in done.stderr
    assert "Traceback" not in done.stderr


def test_paper_config_on_a_small_cpu_stops_with_a_clear_message(monkeypatch):
    from custom import engines
    from custom.errors import InputError

    monkeypatch.setattr(engines, "_available_memory_gib", lambda: 24.0)
    with pytest.raises(InputError, match="cpu_small.yaml"):
        engines.check_cpu_memory("cpu", 8, [96, 96, 96], [64, 128, 256, 512, 768])
    engines.check_cpu_memory("cpu", 4, [48, 48, 48], [8, 16, 32, 64, 96])  # the CPU-size config fits
    engines.check_cpu_memory("cuda", 8, [96, 96, 96], [64, 128, 256, 512, 768])  # not checked on a GPU


def test_evaluate_config_reports_retrieval(qmri_dir, tmp_path):
    run_workflow(**tiny_overrides(qmri_dir, tmp_path, iterations_per_epoch=1))
    overrides = {
        **tiny_overrides(qmri_dir, tmp_path),
        "eval_split": "all",
        "eval_protocols": 4,
        "eval_roi_mm": 96.0,
        "probe_dataset_dir": str(qmri_dir),
    }
    workflow = ConfigWorkflow(
        config_file=[TRAIN, str(BUNDLE / "configs" / "evaluate.yaml")],
        workflow_type="infer",
        run_id="evaluating",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    import json

    record = json.loads((tmp_path / "invariance.json").read_text())
    assert set(record["results"]) == {"pretrained", "random init"}
    assert 0.0 <= record["results"]["pretrained"]["top1"] <= 1.0 and record["n_subjects"] == 3
    # the cross-contrast probe table: the encoder against the baselines, normalised as its views were (histeq)
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    table = (tmp_path / "probe" / "probe.md").read_text()
    for name in ("pretrained", "position", "intensity", "random"):
        assert f"| {name} |" in table, name
    assert "histeq" in json.dumps(probe)


def test_augment_key_reaches_the_views_paper_by_default_light_on_cpu_small():
    from monai.bundle import ConfigParser
    from monai.transforms import RandFlipd

    from custom.transforms import ContrastiveViewsd, RandCuboidDropoutd

    def views_transform(files: list[str]) -> ContrastiveViewsd:
        parser = ConfigParser()
        parser.read_config(files)
        parser["bundle_root"] = str(BUNDLE)
        parser["view_path"] = "per_sample"  # the default on a GPU is batched (tests/test_batched_views.py)
        transforms = parser.get_parsed_content("train#preprocessing").transforms
        return next(t for t in transforms if isinstance(t, ContrastiveViewsd))

    def probabilities(views: ContrastiveViewsd) -> dict[str, float]:
        flips = [t.prob for t in views.augment.spatial.transforms if isinstance(t, RandFlipd)]
        holes = [t.prob for t in views.augment.artefacts.transforms if isinstance(t, RandCuboidDropoutd)]
        return {"flip": max(flips), "holes": holes[0]}

    paper = views_transform([str(TRAIN)])
    light = views_transform([str(TRAIN), str(BUNDLE / "configs" / "cpu_small.yaml")])
    assert probabilities(paper) == {"flip": 0.5, "holes": 1.0}
    assert probabilities(light) == {"flip": 0.0, "holes": 0.0}

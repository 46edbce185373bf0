"""The downstream train.yaml files: their shared part matches its one source, and their config keys reach the runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from custom.config_sync import DOWNSTREAM_BUNDLES, MARKER, SHARED_TRAIN, render, sync_configs
from custom.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _copy_configs(tmp_path: Path) -> Path:
    """The shared source and the three downstream train.yaml files, in a repository-like folder."""
    (tmp_path / SHARED_TRAIN).parent.mkdir(parents=True)
    shutil.copy(REPO / SHARED_TRAIN, tmp_path / SHARED_TRAIN)
    for name in DOWNSTREAM_BUNDLES:
        folder = tmp_path / "bundles" / name / "configs"
        folder.mkdir(parents=True)
        shutil.copy(REPO / "bundles" / name / "configs" / "train.yaml", folder / "train.yaml")
    return tmp_path


def test_committed_train_configs_match_the_shared_source():
    assert sync_configs(REPO) == [], "run `seqinv configs --write` after editing bundles/_shared/downstream_train.yaml"
    shared = (REPO / SHARED_TRAIN).read_text()
    for name in DOWNSTREAM_BUNDLES:
        text = (REPO / "bundles" / name / "configs" / "train.yaml").read_text()
        assert text.endswith(shared) and text.count(MARKER) == 1


def test_a_drifted_copy_is_found_and_rewritten_keeping_its_head(tmp_path):
    root = _copy_configs(tmp_path)
    target = root / "bundles" / "arc_lesion_seg" / "configs" / "train.yaml"
    original = target.read_text()
    target.write_text(original.replace("print_lr: true", "print_lr: false"))
    (root / "bundles" / "ixi_denoise" / "configs" / "train.yaml").write_text(
        (root / "bundles" / "ixi_denoise" / "configs" / "train.yaml").read_text() + "extra: 1\n"
    )
    stale = sync_configs(root)
    assert [p.parent.parent.name for p in stale] == ["arc_lesion_seg", "ixi_denoise"]
    assert "print_lr: false" in target.read_text()  # checking alone writes nothing
    assert sync_configs(root, write=True) == stale
    assert target.read_text() == original and sync_configs(root) == []

    # an edit of the source reaches every copy, and the heads stay
    source = root / SHARED_TRAIN
    source.write_text(source.read_text().replace("num_workers: 0", "num_workers: 1"))
    assert len(sync_configs(root, write=True)) == len(DOWNSTREAM_BUNDLES)
    assert "num_workers: 1" in target.read_text() and "lesion_patch_fraction: 0.7" in target.read_text()


def test_missing_marker_is_an_error_naming_the_file():
    with pytest.raises(InputError, match="train.yaml: no line"):
        render("a: 1\n", MARKER + "\nb: 2\n")
    assert render("a: 1\n" + MARKER + "\nold: 0\n", MARKER + "\nb: 2\n") == "a: 1\n" + MARKER + "\nb: 2\n"


def test_cli_configs_exit_code(tmp_path, capsys):
    from custom.cli import main

    root = _copy_configs(tmp_path)
    assert main(["configs", "--root", str(root)]) == 0
    target = root / "bundles" / "ixi_tissue_seg" / "configs" / "train.yaml"
    target.write_text(target.read_text().replace("batch_size: 1\n", "batch_size: 2\n"))
    with pytest.raises(SystemExit) as stop:
        main(["configs", "--root", str(root)])
    assert stop.value.code == 1 and "differs from" in capsys.readouterr().out
    assert main(["configs", "--root", str(root), "--write"]) == 0 and sync_configs(root) == []


@pytest.mark.parametrize("name", ["ixi_tissue_seg", "arc_lesion_seg"])
def test_augmentation_keys_reach_the_training_transforms(name):
    """Each probability and range is a config key; command-line style overrides change the built transforms."""
    import math

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.yaml"))
    parser.update({"aug_affine_prob": 0.25, "aug_rotate_deg": 30.0, "aug_gamma_prob": 0.0, "aug_noise_std": 0.5})
    parser.update({"samples_per_image": 3, "pixdim": [4.0, 4.0, 4.0]})
    steps = {type(t).__name__: t for t in parser.get_parsed_content("train_transforms").transforms}
    affine = steps["RandAffined"]
    assert affine.prob == 0.25
    assert affine.rand_affine.rand_affine_grid.rotate_range == pytest.approx((math.pi / 6,) * 3)
    assert steps["RandAdjustContrastd"].prob == 0.0
    assert steps["RandGaussianNoised"].rand_gaussian_noise.std == 0.5
    crop = steps["RandCropByPosNegLabeld"]
    assert crop.cropper.num_samples == 3
    fraction = parser["lesion_patch_fraction" if name == "arc_lesion_seg" else "foreground_patch_fraction"]
    assert crop.cropper.pos_ratio == pytest.approx(fraction)


def test_multi_gpu_config_adds_only_what_it_changes(monkeypatch):
    """Logging handlers on rank 0 only, every-rank handlers everywhere, DDP steps appended to the run lists."""
    import torch.distributed as dist
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / "ixi_tissue_seg" / "configs"
    override = ConfigParser.load_config_file(str(configs / "multi_gpu_train.yaml"))
    assert not any("handlers" in key and isinstance(value, list) for key, value in override.items())
    for rank, expected in ((0, ["every", "logging"]), (1, ["every"])):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        parser = ConfigParser()
        parser.read_config([str(configs / "train.yaml"), str(configs / "multi_gpu_train.yaml")])
        for stage in ("train", "validate"):
            parser[f"{stage}#handlers"] = ["every"]
            parser[f"{stage}#logging_handlers"] = ["logging"]
        assert parser.get_parsed_content("train#trainer#train_handlers") == expected
        assert parser.get_parsed_content("validate#evaluator#val_handlers") == expected
    setup, run = parser["training_setup"], parser["training_run"]
    assert setup[0] == "$custom.errors.report_input_errors()" and "init_process_group" in setup[-2]
    assert run[-2].endswith("trainer.run()") and "destroy_process_group" in run[-1]

"""The ``seqinv`` command line (python-fire).

Commands:
    seqinv synth --out data/synthetic --subjects 4 --seed 0 [--resolution 2] [--preview]
    seqinv simulate --sequence mprage --preset clinical --seed 0   (print one sampled protocol)
    seqinv invariance --weights bundles/seqinv_pretrain/models/model.pt --dataset_dir data/heldout/qmri --split all
    seqinv check bundles/ixi_tissue_seg                       (metadata against the bundle specification)
    seqinv package bundles/ixi_tissue_seg --out dist/         (deterministic zip + dist/model_info.json)
    seqinv verify X/ixi_tissue_seg.zip --model_info dist/model_info.json
    seqinv fetch --name ixi_tissue_seg --url file:///.../ixi_tissue_seg_v0.1.0.zip --bundle_dir X \
        --model_info dist/model_info.json                     (download, check sha256, install with MONAI)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fire

__all__ = ["Commands", "main"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


class Commands:
    """Sequence-invariant MRI representations: data synthesis and utilities."""

    def synth(
        self,
        out: str = "data/synthetic",
        subjects: int = 4,
        seed: int = 0,
        resolution: float = 2.0,
        preview: bool = False,
        quiet: bool = False,
    ) -> None:
        """Write the embedded synthetic data set (qMRI maps, IXI-like and ARC-like images) under ``out``.

        Args:
            out: output folder (created if missing).
            subjects: number of subjects of each data set (qMRI, IXI-like, ARC-like), >= 1.
            seed: random seed; the same seed gives the same data.
            resolution: isotropic voxel size in mm (2 is CPU friendly, 1 is the template's full resolution).
            preview: also write ``out/preview.png``, a montage of every simulated contrast.
            quiet: no progress bar.
        """
        from custom.data.synthetic import generate_dataset

        if int(subjects) < 1:
            raise CommandError(f"--subjects must be >= 1, got {subjects}")
        if float(resolution) <= 0:
            raise CommandError(f"--resolution must be a positive size in mm, got {resolution}")
        summary = generate_dataset(
            Path(out),
            subjects=int(subjects),
            seed=int(seed),
            resolution=float(resolution),
            preview=bool(preview),
            progress=not quiet,
        )
        print(json.dumps(summary, indent=2, default=str))

    def invariance(
        self,
        weights: str | None = None,
        dataset_dir: str = "data/synthetic/qmri",
        features: tuple[int, ...] | list[int] = (64, 128, 256, 512, 768),
        k: int = 8,
        preset: str = "clinical",
        split: str = "validation",
        val_fraction: float = 0.2,
        seed: int = 0,
        noise: float = 0.01,
        roi_mm: float | None = 128.0,
        compare_random: bool = True,
        output_json: str | None = None,
        device: str | None = None,
    ) -> None:
        """Cross-sequence retrieval: is the nearest embedding under another sequence the same subject?

        Embeds each subject under ``k`` simulated protocols and reports top-1 retrieval accuracy and the ratio of
        same-subject to different-subject distances, for the given encoder weights and a random-init encoder.

        Args:
            weights: encoder weights (``models/model.pt``, a checkpoint, or a bundle folder); none: random init.
            dataset_dir: folder of qMRI subject folders.
            features: encoder widths the weights were trained with, e.g. ``"[8,16,32,64,96]"``.
            k: protocols per subject (sequence types round-robin). preset: ``clinical`` or ``paper``.
            split: ``all`` subjects of the folder, or the pretraining datalist's ``validation`` split.
            val_fraction, seed: the split (as in the pretraining bundle).
            noise: Rician noise sigma on the normalised images. roi_mm: edge of the embedded cube, mm.
            compare_random: also evaluate a random-init encoder in the same run.
            output_json: write the results there.
            device: ``cuda`` or ``cpu`` (default: cuda when available).
        """
        from custom.invariance import run_invariance

        run_invariance(
            weights,
            dataset_dir,
            features=tuple(int(f) for f in features),
            k=int(k),
            preset=preset,
            seed=int(seed),
            device=device,
            output_json=output_json,
            split=split,
            compare_random=bool(compare_random),
            noise=float(noise),
            val_fraction=float(val_fraction),
            roi_mm=None if roi_mm is None else float(roi_mm),
        )

    def simulate(self, sequence: str | None = None, preset: str = "paper", seed: int = 0) -> None:
        """Print one sampled protocol (SI units) as JSON, e.g. to inspect a preset."""
        from custom.sequences import sample_sequence

        try:
            sample = sample_sequence(sequence, preset=preset, generator=int(seed))
        except ValueError as err:
            raise CommandError(str(err)) from err
        print(str(sample))
        print(json.dumps(sample.to_dict(), indent=2))

    def check(self, *bundles: str) -> None:
        """Check each bundle's ``configs/metadata.json`` against the bundle specification (offline schema)."""
        from custom.bundle_check import validate_metadata

        if not bundles:
            raise CommandError("give one or more bundle folders, e.g. seqinv check bundles/*")
        for bundle in bundles:
            metadata = validate_metadata(bundle)
            print(f"{bundle}: metadata OK ({metadata['name']} {metadata['version']})")

    def package(
        self, bundle: str, out: str = "dist", weights_url: str | None = None, allow_missing_weights: bool = False
    ) -> None:
        """Write ``<out>/<name>_v<version>.zip`` (bundle + a copy of ``custom/``) and record it in model_info.json.

        Args:
            bundle: the bundle folder, e.g. ``bundles/ixi_tissue_seg``.
            out: output folder.
            weights_url: keep the weights out of the zip and list them in ``large_files.yml`` with this URL
                (``{name}`` is replaced by the file name), e.g. a GitHub release asset URL.
            allow_missing_weights: package a bundle without ``models/model.pt``.
        """
        from custom.packaging import MODEL_INFO, package_bundle

        result = package_bundle(bundle, out, weights_url=weights_url, allow_missing_weights=bool(allow_missing_weights))
        print(f"{result.zip_path}: {len(result.entries)} files, weights {result.weights}, sha256 {result.sha256}")
        print(f"recorded in {Path(out) / MODEL_INFO}")

    def verify(self, zip_path: str, model_info: str, name: str | None = None, version: str | None = None) -> None:
        """Check a downloaded bundle zip's sha256 against ``model_info.json`` (a path or URL) before using it."""
        from custom.packaging import verify_bundle_zip

        entry = verify_bundle_zip(zip_path, model_info, name=name, version=version)
        print(f"{zip_path}: sha256 OK ({entry['name']} {entry['version']})")

    def fetch(self, name: str, url: str, bundle_dir: str, model_info: str, version: str | None = None) -> None:
        """Download a bundle zip, verify its sha256 against ``model_info``, then install it with MONAI's download."""
        from custom.packaging import fetch_bundle

        folder = fetch_bundle(name, url, bundle_dir, model_info, version=version)
        print(f"installed {folder}; run e.g. python -m monai.bundle run --config_file {folder}/configs/inference.yaml")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``seqinv`` console script."""
    try:
        fire.Fire(Commands, command=argv, name="seqinv")
    except CommandError as err:
        print(f"seqinv: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as err:  # InputError is a ValueError
        print(f"seqinv: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

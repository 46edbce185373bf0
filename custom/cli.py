"""The ``seqinv`` command line (python-fire).

Commands:
    seqinv synth --out data/synthetic --subjects 4 --seed 0 [--resolution 2] [--preview]
    seqinv simulate --sequence mprage --preset clinical --seed 0   (print one sampled protocol)
    seqinv invariance --weights bundles/seqinv_pretrain/models/model.pt --dataset_dir data/heldout/qmri \
        [--encoders "{'base': 'base/model.pt'}"] [--output_dir out/probe]   (linear probe + baselines)
    seqinv invariance --retrieval_only --weights ... --features "[8,16,32,64,96]" --split all   (retrieval alone)
    seqinv check bundles/ixi_tissue_seg                       (metadata against the bundle specification)
    seqinv configs [--write]          (downstream train.yaml files against bundles/_shared/downstream_train.yaml)
    seqinv package bundles/ixi_tissue_seg --out dist/         (deterministic zip + dist/model_info.json)
    seqinv verify X/ixi_tissue_seg.zip --model_info dist/model_info.json
    seqinv fetch --name ixi_tissue_seg --url file:///.../ixi_tissue_seg_v0.1.0.zip --bundle_dir X \
        --model_info dist/model_info.json                     (download, check sha256, install with MONAI)
    seqinv import-encoder midl-2025-seq-inv.pt --out model.pt (the authors' released encoder -> our encoder weights)
    seqinv experiment --grid grid.yaml --out runs/experiment [--preset cpu|paper] [--dry_run]
                                                              (encoder x task x fraction x contrast x seed grid)
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
        ixi_image_models: dict[str, str] | None = None,
    ) -> None:
        """Write the embedded synthetic data set (qMRI maps, IXI-like and ARC-like images) under ``out``.

        Args:
            out: output folder (created if missing).
            subjects: number of subjects of each data set (qMRI, IXI-like, ARC-like), >= 1.
            seed: random seed; the same seed gives the same data.
            resolution: isotropic voxel size in mm (2 is CPU friendly, 1 is the template's full resolution).
            preview: also write ``out/preview.png``, a montage of every simulated contrast.
            quiet: no progress bar.
            ixi_image_models: IXI sites whose images come from another image model than the signal equations,
                e.g. ``"{HH: gmm, IOP: template}"`` (``gmm``: random per-tissue intensities; ``template``: the
                MNI152 T1 under each subject's warp, T1 only). Default: every site ``physics``.
        """
        from custom.data.synthetic import generate_dataset, ixi_site_models

        if int(subjects) < 1:
            raise CommandError(f"--subjects must be >= 1, got {subjects}")
        if float(resolution) <= 0:
            raise CommandError(f"--resolution must be a positive size in mm, got {resolution}")
        if ixi_image_models is not None and not isinstance(ixi_image_models, dict):
            raise CommandError(f'--ixi_image_models must be a mapping like "{{HH: gmm}}", got {ixi_image_models!r}')
        try:
            ixi_site_models(ixi_image_models)
        except ValueError as err:
            raise CommandError(f"--ixi_image_models: {err}") from None
        summary = generate_dataset(
            Path(out),
            subjects=int(subjects),
            seed=int(seed),
            resolution=float(resolution),
            preview=bool(preview),
            progress=not quiet,
            ixi_image_models=ixi_image_models,
        )
        print(json.dumps(summary, indent=2, default=str))

    def invariance(
        self,
        weights: str | None = None,
        dataset_dir: str = "data/synthetic/qmri",
        encoders: dict[str, str] | None = None,
        retrieval_only: bool = False,
        output_dir: str | None = None,
        fit_subjects: int = 6,
        test_subjects: int = 6,
        remove_position: bool = True,
        max_shift: int = 12,
        normalize: str = "zscore",
        baselines: str | tuple[str, ...] | list[str] = ("position", "intensity", "random"),
        test_voxels: int | None = None,
        voxel_standardize: bool = False,
        features: tuple[int, ...] | list[int] = (64, 128, 256, 512, 768),
        k: int = 8,
        preset: str = "clinical",
        split: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        noise: float = 0.01,
        roi_mm: float | None = 128.0,
        jitter_mm: float = 0.0,
        compare_random: bool = True,
        output_json: str | None = None,
        device: str | None = None,
        quiet: bool = False,
    ) -> None:
        """Sequence invariance of encoders: cross-contrast linear tissue probe, dense consistency and retrieval.

        By default runs :func:`custom.probe.run_probe`: a GM/WM/CSF logistic-regression probe on the voxel
        features (all encoder levels), fit on ``fit_subjects`` subjects under one contrast and scored (balanced
        accuracy) on ``test_subjects`` others under every contrast of a 7-contrast panel, with position cues
        removed (random flips and shifts); plus dense feature consistency and cross-sequence retrieval, for the
        given encoders and the ``position``, ``intensity`` and ``random`` baselines. The subject folders need
        ``*_labels`` tissue maps (``seqinv synth`` writes them). With ``--retrieval_only`` runs the earlier
        label-free retrieval evaluation (:func:`custom.invariance.run_invariance`) alone.

        Args:
            weights: encoder weights (``models/model.pt``, a checkpoint, or a bundle folder), labelled
                ``pretrained``; none: baselines only (probe) / a random-init encoder (retrieval).
            dataset_dir: folder of qMRI subject folders.
            encoders: more encoders for the probe, e.g. ``"{'base': 'runs/base/model.pt'}"``.
            retrieval_only: run only the retrieval evaluation (the behaviour before the probe existed).
            output_dir: probe outputs (``probe.json``, ``probe.md``, ``probe.png``); none: printed only.
            fit_subjects, test_subjects: the first / next subject folders (sorted) that fit / test the probe.
            remove_position, max_shift: random flips and shifts (voxels) that remove position cues.
            normalize: ``zscore`` (inside the brain; default), ``percentile`` or ``none``.
            baselines: probe baselines, e.g. ``position,intensity``; ``""`` for none.
            test_voxels: scored voxels per test subject (default: all brain voxels).
            voxel_standardize: standardise each level's feature vector per voxel before the probe.
            features: encoder widths: of the random baseline when no weights are given (probe; else read from
                the weights), of the weights (retrieval), e.g. ``"[8,16,32,64,96]"``.
            k, preset, split, val_fraction, roi_mm, jitter_mm, compare_random, output_json: retrieval only
                (``split`` defaults to ``validation``; the probe takes every subject folder of ``dataset_dir``).
            seed: seeds protocols, noise, flips/shifts, voxel samples, random init and bootstrap.
            noise: Rician noise sigma on the normalised images.
            device: ``cuda`` or ``cpu`` (default: cuda when available).
            quiet: no progress bars.
        """
        if retrieval_only:
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
                split=split or "validation",
                compare_random=bool(compare_random),
                noise=float(noise),
                val_fraction=float(val_fraction),
                roi_mm=None if roi_mm is None else float(roi_mm),
                jitter_mm=float(jitter_mm),
                progress=not quiet,
            )
            return
        from custom.probe import run_probe

        if split not in (None, "all"):
            raise CommandError(
                f"--split {split} applies to --retrieval_only; the probe takes every subject folder of --dataset_dir "
                "(the first --fit_subjects fit the probe, the next --test_subjects test it)"
            )
        if output_json is not None:
            raise CommandError("--output_json applies to --retrieval_only; the probe writes into --output_dir")
        if encoders is not None and not isinstance(encoders, dict):
            raise CommandError(
                f"--encoders must be a dict of name -> weights, e.g. \"{{'base': 'model.pt'}}\"; got {encoders!r}"
            )
        if isinstance(baselines, str):
            baselines = tuple(b.strip() for b in baselines.split(",") if b.strip())
        chosen: dict[str, str] = {}
        if weights is not None:
            chosen["pretrained"] = str(weights)
        for name, path in (encoders or {}).items():
            if str(name) in chosen:
                raise CommandError(f"encoder name {name!r} is used twice (--weights is labelled 'pretrained')")
            chosen[str(name)] = str(path)
        run_probe(
            chosen,
            dataset_dir,
            fit_subjects=int(fit_subjects),
            test_subjects=int(test_subjects),
            seed=int(seed),
            features=tuple(int(f) for f in features),
            output_dir=output_dir,
            baselines=tuple(str(b) for b in baselines),
            remove_position=bool(remove_position),
            max_shift=int(max_shift),
            normalize=str(normalize),
            noise=float(noise),
            preset=preset,
            test_voxels=None if test_voxels is None else int(test_voxels),
            voxel_standardize=bool(voxel_standardize),
            device=device,
            progress=not quiet,
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
            if Path(bundle).name.startswith("_"):  # bundles/_shared: config sources, not a bundle
                continue
            metadata = validate_metadata(bundle)
            print(f"{bundle}: metadata OK ({metadata['name']} {metadata['version']})")

    def configs(self, write: bool = False, root: str = ".") -> None:
        """Check (or with ``--write`` rewrite) the shared part of the downstream bundles' ``train.yaml`` files.

        Its one source is ``bundles/_shared/downstream_train.yaml``; each downstream ``train.yaml`` holds a copy
        after its own head, so a packaged bundle stays self-contained. Exit code 1 when a copy is stale.
        """
        from custom.config_sync import SHARED_TRAIN, sync_configs

        stale = sync_configs(root, write=bool(write))
        for path in stale:
            print(f"{path}: {'rewritten from' if write else 'differs from'} {SHARED_TRAIN}")
        if stale and not write:
            print("run `seqinv configs --write` to update them", file=sys.stderr)
            raise SystemExit(1)
        if not stale:
            print(f"downstream train.yaml files match {SHARED_TRAIN}")

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

    def import_encoder(self, source: str, out: str, features: tuple[int, ...] | list[int] | None = None) -> None:
        """Convert one of the authors' released encoders into this project's encoder weights (``model.pt``).

        The files (Hugging Face ``liamchalcroft/midl-2025-base``, ``-seq-aug``, ``-seq-inv``; Apache-2.0) are not
        downloaded here: fetch one yourself and check its sha256 against the one the Hub lists for it. The keys
        (MONAI ``BasicUNet`` encoder modules ``conv_0``, ``down_1`` ... ``down_4``, any ``_orig_mod.`` prefix) are
        mapped onto ``custom.networks.Encoder``; the file's config and widths are checked and every tensor must be
        copied, or nothing is written.

        Args:
            source: the downloaded file.
            out: where to write the converted encoder state dict (e.g. ``bundles/seqinv_pretrain/models/model.pt``,
                or any file for ``--pretrained_encoder``).
            features: expected widths, e.g. ``"[64,128,256,512,768]"`` (default: the file's own).
        """
        from custom.authors_weights import import_authors_encoder

        report = import_authors_encoder(
            source, out, features=None if features is None else tuple(int(f) for f in features)
        )
        print(f"{report['source']}: sha256 {report['source_sha256']}")
        print(f"encoder widths {list(report['features'])}: copied {report['copied']}/{report['total']} tensors")
        print(f"wrote {report['out']} (sha256 {report['out_sha256']})")

    def fetch(self, name: str, url: str, bundle_dir: str, model_info: str, version: str | None = None) -> None:
        """Download a bundle zip, verify its sha256 against ``model_info``, then install it with MONAI's download."""
        from custom.packaging import fetch_bundle

        folder = fetch_bundle(name, url, bundle_dir, model_info, version=version)
        print(f"installed {folder}; run e.g. python -m monai.bundle run --config_file {folder}/configs/inference.yaml")

    def experiment(
        self,
        grid: str | None = None,
        out: str = "runs/experiment",
        preset: str | None = None,
        dry_run: bool = False,
        jobs: int | None = None,
    ) -> None:
        """Train and evaluate every cell of an experiment grid (README, "Experiments"); resumable.

        Each cell is one ``python -m monai.bundle run training`` and one ``run evaluating`` of a downstream bundle
        in ``<out>/cells/<cell>/`` (log: ``log.txt``); finished cells are skipped. Writes ``<out>/grid.yaml`` (the
        resolved grid), ``results.csv``, ``tables.md`` and ``figure.png``. Exit code 1 when a cell failed.

        Args:
            grid: grid YAML file (encoders, tasks, fractions, contrasts, seeds, overrides).
            out: output folder.
            preset: ``cpu`` or ``paper``; with ``--grid`` the file's keys override the preset's.
            dry_run: list the cells and write ``grid.yaml`` without running anything.
            jobs: cells run at once, each with (CPU cores / jobs) threads; default: the grid's ``jobs`` (1).
        """
        from custom.experiment import run_experiment

        result = run_experiment(grid=grid, out=out, preset=preset, dry_run=bool(dry_run), jobs=jobs)
        if result.failed:
            raise SystemExit(1)


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

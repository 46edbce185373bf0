"""The ``seqinv`` command line (python-fire).

Commands:
    seqinv synth --out data/synthetic --subjects 4 --seed 0 [--resolution 2] [--preview]
    seqinv simulate --sequence mprage --preset clinical --seed 0   (print one sampled protocol)
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

    def simulate(self, sequence: str | None = None, preset: str = "paper", seed: int = 0) -> None:
        """Print one sampled protocol (SI units) as JSON, e.g. to inspect a preset."""
        from custom.sequences import sample_sequence

        try:
            sample = sample_sequence(sequence, preset=preset, generator=int(seed))
        except ValueError as err:
            raise CommandError(str(err)) from err
        print(str(sample))
        print(json.dumps(sample.to_dict(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``seqinv`` console script."""
    try:
        fire.Fire(Commands, command=argv, name="seqinv")
    except CommandError as err:
        print(f"seqinv: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as err:
        print(f"seqinv: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embedded synthetic dataset: qMRI maps, IXI-like and ARC-like images, built from the MNI152 2009a template.

The anatomy comes from the MNI152 2009a template shipped inside ``nilearn`` (read from disk, no network): the
grey- and white-matter probability maps and the brain mask; CSF is the brain mask minus GM and WM (partial
volume), everything outside the mask is background. Each subject gets

* a random small affine (rotations of a few degrees, scaling +-5 %, a few mm of translation) and a random smooth
  displacement field (a few mm RMS), applied together to the template probability maps in one resampling;
* per-tissue qMRI values drawn around the 3 T literature values of ``docs/paper-notes.md`` (between-subject variation
  of about 5-10 %), partial-volume mixing (voxel value = sum over tissues of probability x tissue value) and a
  mild spatially correlated texture (3 % RMS);
* for stroke subjects, 1-3 smooth irregular lesion blobs in the grey/white matter of mostly one hemisphere with
  their own qMRI values, blended with the surrounding tissue at the border.

Three layouts (:mod:`.layouts`), mimicking the real datasets so their datalist builders can be exercised (see
:func:`generate_dataset`): hMRI-style qMRI maps (PD and MT in percent, rates in 1/s), IXI-like T1/T2/PD images
from three sites with fixed per-site protocols (:data:`SITE_PROTOCOLS`), and an ARC-like BIDS dataset with
T1w/T2w/FLAIR images and lesion masks (:data:`ARC_PROTOCOL`). Each dataset draws its own anatomies (no subject is
shared between the pretraining and the downstream sets, as with the real data). Subject ``k`` of a dataset is
generated from a random generator seeded with ``(seed, dataset, k)`` alone, so it is the same whatever the
number of subjects asked for.

Units: lengths in mm, times in seconds, rates in 1/s, PD and MT as fractions in memory (percent on disk in the
qMRI layout, as the hMRI toolbox writes them).

Modules, in the order of the simulation:

* :mod:`.tissues` - tissue and lesion qMRI value tables; :mod:`.protocols` - fixed site / ARC protocols;
* :mod:`.template` - the MNI152 template and the output grid; :mod:`.fields` - random smooth fields;
* :mod:`.anatomy` - random warp of the template's tissue maps; :mod:`.lesions` - stroke lesions;
* :mod:`.subject` - per-subject tissue values, partial-volume qMRI maps, :class:`Subject`;
* :mod:`.acquisition` - images from qMRI maps (:func:`physics_ixi_images`, the default IXI image model; the
  others, ``"gmm"`` and ``"template"``, are in :mod:`custom.data.image_models`, chosen per site by
  ``generate_dataset(ixi_image_models=...)``);
* :mod:`.files` - atomic NIfTI writing on a thread pool; :mod:`.layouts` - qMRI / IXI / ARC folder layouts;
* :mod:`.generate` - :func:`generate_dataset` and the preview montage.
"""

from __future__ import annotations

from custom.data.synthetic.acquisition import (
    acquire,
    acquire_session,
    bias_field,
    physics_ixi_images,
)
from custom.data.synthetic.anatomy import (
    DISPLACEMENT_RMS_MM,
    ROTATION_DEG,
    SCALING,
    TRANSLATION_MM,
    sampling_coordinates,
    tissue_fractions,
    tissue_labels,
    warp_tissues,
)
from custom.data.synthetic.fields import random_rotation, smooth_field, smooth_noise
from custom.data.synthetic.files import PooledWriter, save_nifti
from custom.data.synthetic.generate import generate_dataset, ixi_site_models, write_preview
from custom.data.synthetic.layouts import (
    QMRI_UNITS_ON_DISK,
    arc_sessions,
    arc_subject_id,
    is_stroke_qmri,
    ixi_subject_id,
    qmri_subject_id,
    subject_rng,
    write_arc,
    write_arc_metadata,
    write_ixi,
    write_qmri,
)
from custom.data.synthetic.lesions import make_lesion
from custom.data.synthetic.protocols import ARC_PROTOCOL, IXI_SITES, SITE_PROTOCOLS, SiteProtocol
from custom.data.synthetic.subject import Subject, make_subject, mix_maps, sample_tissue_values
from custom.data.synthetic.template import Template, load_template, output_grid
from custom.data.synthetic.tissues import (
    BETWEEN_SUBJECT_LOG_SD,
    LESION_QMRI,
    PLAUSIBLE_FRACTIONS,
    QMRI_KINDS,
    TEXTURE_RMS,
    TEXTURE_SIGMA_MM,
    TISSUE_QMRI,
    TISSUES,
)

__all__ = [
    "TISSUES",
    "QMRI_KINDS",
    "TISSUE_QMRI",
    "LESION_QMRI",
    "PLAUSIBLE_FRACTIONS",
    "SiteProtocol",
    "SITE_PROTOCOLS",
    "ARC_PROTOCOL",
    "IXI_SITES",
    "Template",
    "Subject",
    "load_template",
    "make_subject",
    "subject_rng",
    "acquire",
    "acquire_session",
    "physics_ixi_images",
    "save_nifti",
    "generate_dataset",
    "ixi_site_models",
    # also importable from here, as from the single module this package replaced
    "BETWEEN_SUBJECT_LOG_SD",
    "DISPLACEMENT_RMS_MM",
    "QMRI_UNITS_ON_DISK",
    "ROTATION_DEG",
    "SCALING",
    "TEXTURE_RMS",
    "TEXTURE_SIGMA_MM",
    "TRANSLATION_MM",
    "PooledWriter",
    "arc_sessions",
    "arc_subject_id",
    "bias_field",
    "is_stroke_qmri",
    "ixi_subject_id",
    "make_lesion",
    "mix_maps",
    "output_grid",
    "qmri_subject_id",
    "random_rotation",
    "sample_tissue_values",
    "sampling_coordinates",
    "smooth_field",
    "smooth_noise",
    "tissue_fractions",
    "tissue_labels",
    "warp_tissues",
    "write_arc",
    "write_arc_metadata",
    "write_ixi",
    "write_preview",
    "write_qmri",
]

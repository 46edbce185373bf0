"""Tests of the downstream image models (physics / gmm / template) on synthetic subjects (CPU, 4 mm voxels)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from custom.data import image_models as im
from custom.data import synthetic

RES = 4.0
SITE = synthetic.SITE_PROTOCOLS["Guys"]


@pytest.fixture(scope="module")
def template() -> synthetic.Template:
    return synthetic.load_template(RES)


@pytest.fixture(scope="module")
def anatomy(template: synthetic.Template) -> im.SubjectAnatomy:
    return im.make_subject_anatomy(template, np.random.default_rng(7))


def _tissue_means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean intensity of GM, WM, CSF (labels 1, 2, 3)."""
    return np.array([image[labels == k].mean() for k in (1, 2, 3)], dtype=np.float64)


def _label_r2(image: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the image's variance explained by its per-label means."""
    fit = np.zeros_like(image, dtype=np.float64)
    for k in np.unique(labels):
        fit[labels == k] = image[labels == k].mean()
    return 1.0 - float(np.var(image - fit)) / float(np.var(image))


def test_anatomy_replays_make_subject(template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    plain = synthetic.make_subject(template, np.random.default_rng(7))
    assert np.array_equal(plain.labels, anatomy.subject.labels)
    for kind, values in plain.maps.items():
        assert np.array_equal(values, anatomy.subject.maps[kind]), kind
    # the generator is left exactly where make_subject leaves it
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    synthetic.make_subject(template, a)
    im.make_subject_anatomy(template, b)
    assert a.random() == b.random()
    probs = anatomy.probs
    assert set(probs) == {"bg", "GM", "WM", "CSF"}
    assert np.allclose(sum(probs.values()), 1.0, atol=1e-5)
    assert np.array_equal(synthetic.tissue_labels(probs), anatomy.subject.labels)
    assert anatomy.coords.shape == (3, *template.shape) and anatomy.coords.dtype == np.float32
    warped_mask = ndimage.map_coordinates(template.mask, anatomy.coords, order=1, mode="constant", cval=0.0)
    assert np.allclose(np.clip(warped_mask, 0, 1), 1.0 - probs["bg"], atol=1e-5)


@pytest.mark.parametrize("model", im.IMAGE_MODELS)
def test_images_finite_float32_on_grid(model: str, template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    labels = anatomy.subject.labels
    for contrast in im.image_contrasts(model, SITE):
        image = im.render_image(model, anatomy, template, SITE, contrast, np.random.default_rng(1))
        assert image.dtype == np.float32 and image.shape == labels.shape == tuple(template.shape)
        assert np.all(np.isfinite(image)) and image.min() >= 0
        assert np.array_equal(image, np.round(image)), "scanner units hold integers, as acquire writes them"
        brain = image[labels > 0]
        assert 0.5 * SITE.scale < np.percentile(brain, 99) < 1.5 * SITE.scale
        air = image[ndimage.binary_erosion(labels == 0, iterations=2)]
        assert 0 < air.mean() < 0.1 * brain.mean(), "air holds noise only, as in the physics images"


def test_model_contrasts() -> None:
    assert im.image_contrasts("physics", SITE) == ("T1", "T2", "PD")
    assert im.image_contrasts("gmm", SITE) == ("T1", "T2", "PD")
    assert im.image_contrasts("template", SITE) == ("T1",)
    assert im.image_contrasts("template", synthetic.ARC_PROTOCOL) == ("T1w",)


def test_unknown_model_and_bad_arguments(template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"'synthseg'.*physics, gmm, template"):
        im.render_image("synthseg", anatomy, template, SITE, "T1", rng)
    with pytest.raises(ValueError, match="'synthseg'"):
        im.image_contrasts("synthseg", SITE)
    with pytest.raises(ValueError, match="'FLAIR'"):
        im.render_image("gmm", anatomy, template, SITE, "FLAIR", rng)
    with pytest.raises(ValueError, match="T1-weighted"):
        im.render_image("template", anatomy, template, SITE, "T2", rng)
    with pytest.raises(TypeError, match="make_subject_anatomy"):
        im.render_image("gmm", anatomy.subject, template, SITE, "T1", rng)
    # a plain Subject is enough for the physics model
    image = im.render_image("physics", anatomy.subject, template, SITE, "T1", rng)
    assert image.shape == anatomy.subject.labels.shape


@pytest.mark.parametrize("model", im.IMAGE_MODELS)
def test_deterministic(model: str, template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    a = im.render_image(model, anatomy, template, SITE, "T1", np.random.default_rng(5))
    b = im.render_image(model, anatomy, template, SITE, "T1", np.random.default_rng(5))
    c = im.render_image(model, anatomy, template, SITE, "T1", np.random.default_rng(6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_gmm_contrast_is_random(template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    labels = anatomy.subject.labels
    means = []
    for seed in range(20):
        image = im.gmm_image(anatomy.probs, np.random.default_rng(seed), RES, scale=1000.0)
        means.append(_tissue_means(image, labels))
    means = np.array(means)
    ratios = means / means[:, :1]  # relative to GM
    assert np.abs(ratios[0] - ratios[1]).max() > 0.05, "two generators give different tissue means"
    wm_brighter = means[:, 1] > means[:, 0]
    assert 0 < wm_brighter.sum() < len(wm_brighter), "GM < WM is not fixed across images"
    orders = {tuple(np.argsort(m)) for m in means}
    assert len(orders) >= 4, f"tissue orders seen: {orders}"


def test_gmm_mixing_equation(anatomy: im.SubjectAnatomy) -> None:
    """Without texture, blur, bias and noise the image is the partial-volume mix of the tissue means."""
    means = {"GM": 0.9, "WM": 0.2, "CSF": 0.5}
    params = im.GmmParams(
        means=means, stds=dict.fromkeys(means, 0.0), fwhm_mm=(1e-3,) * 3, bias_rms=0.0, noise_fraction=0.0
    )
    probs = anatomy.probs
    image = im.gmm_image(probs, np.random.default_rng(0), RES, scale=1000.0, params=params)
    mix = sum(probs[t] * m for t, m in means.items())
    assert np.corrcoef(image.ravel(), mix.ravel())[0, 1] > 0.999
    assert np.all(image[probs["bg"] >= 1.0] == 0)


def test_gmm_params_ranges() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = im.sample_gmm_params(rng)
        m = np.array(list(p.means.values()))
        assert all(im.GMM_MEAN_RANGE[0] <= v <= im.GMM_MEAN_RANGE[1] for v in m)
        gaps = np.abs(m[:, None] - m[None, :])[np.triu_indices(3, 1)]
        assert gaps.min() >= im.GMM_MIN_SEPARATION * m.max()
        assert all(im.GMM_STD_RANGE[0] <= v <= im.GMM_STD_RANGE[1] for v in p.stds.values())
        assert all(im.GMM_FWHM_MM[0] <= v <= im.GMM_FWHM_MM[1] for v in p.fwhm_mm)
        assert im.GMM_BIAS_RMS[0] <= p.bias_rms <= im.GMM_BIAS_RMS[1]
        assert im.GMM_NOISE_FRACTION[0] <= p.noise_fraction <= im.GMM_NOISE_FRACTION[1]
    assert set(p.to_dict()) == {"means", "stds", "fwhm_mm", "bias_rms", "noise_fraction"}


def test_gmm_differs_from_physics(template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    labels = anatomy.subject.labels
    physics_orders = set()
    physics_ratios = []
    for site in synthetic.SITE_PROTOCOLS.values():
        for contrast in site.sequences:
            m = _tissue_means(
                im.render_image("physics", anatomy, template, site, contrast, np.random.default_rng(0)), labels
            )
            physics_orders.add(tuple(np.argsort(m)))
            physics_ratios.append(m / m[0])
    gmm_orders = set()
    gmm_ratios = []
    for seed in range(20):
        m = _tissue_means(im.render_image("gmm", anatomy, template, SITE, "T1", np.random.default_rng(seed)), labels)
        gmm_orders.add(tuple(np.argsort(m)))
        gmm_ratios.append(m / m[0])
    assert gmm_orders - physics_orders, "some gmm images have a tissue order no sequence equation gives"
    physics_ratios, gmm_ratios = np.array(physics_ratios), np.array(gmm_ratios)
    # distance of each gmm image's (WM/GM, CSF/GM) to the nearest physics contrast
    nearest = np.min(np.linalg.norm(gmm_ratios[:, None, 1:] - physics_ratios[None, :, 1:], axis=-1), axis=1)
    assert np.median(nearest) > 0.1, nearest
    # and for one image, per voxel: the gmm T1 is not the physics T1 of the same subject
    gmm = im.render_image("gmm", anatomy, template, SITE, "T1", np.random.default_rng(2))
    phys = im.render_image("physics", anatomy, template, SITE, "T1", np.random.default_rng(2))
    brain = labels > 0
    assert np.corrcoef(gmm[brain], phys[brain])[0, 1] < 0.9


def test_template_image(template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    labels = anatomy.subject.labels
    image = im.render_image("template", anatomy, template, SITE, "T1", np.random.default_rng(0))
    warped = im.warped_template_t1(template, anatomy.coords)
    brain = labels > 0
    assert np.corrcoef(image[brain], warped[brain])[0, 1] > 0.85
    gm, wm, csf = _tissue_means(image, labels)
    assert wm > 1.1 * gm and gm > 1.1 * csf, "T1-weighted: WM > GM > CSF"
    # the site's noise level: a noisier site gives a noisier image of the same subject
    quiet = im.template_image(template, anatomy.coords, np.random.default_rng(0), noise_fraction=0.0)
    noisy = im.template_image(template, anatomy.coords, np.random.default_rng(0), noise_fraction=0.05)
    assert np.corrcoef(quiet[brain], warped[brain])[0, 1] > 0.99
    assert np.corrcoef(noisy[brain], warped[brain])[0, 1] < np.corrcoef(quiet[brain], warped[brain])[0, 1]


@pytest.mark.parametrize("model", ["template", "gmm"])
def test_labels_share_the_image_grid(model: str, template: synthetic.Template, anatomy: im.SubjectAnatomy) -> None:
    """The subject's own labels explain the image (within the brain) better than labels shifted by one voxel
    along any axis, and much better than another subject's labels."""
    labels = anatomy.subject.labels
    brain = labels > 0
    image = im.render_image(model, anatomy, template, SITE, "T1", np.random.default_rng(0))[brain]
    r2 = _label_r2(image, labels[brain])
    assert r2 > 0.3
    for axis in range(3):
        for step in (1, -1):
            assert _label_r2(image, np.roll(labels, step, axis=axis)[brain]) < r2 - 0.1, (axis, step)
    other = im.make_subject_anatomy(template, np.random.default_rng(8)).subject.labels
    assert _label_r2(image, other[brain]) < r2 - 0.15


def test_template_refuses_lesions_gmm_shows_them(template: synthetic.Template) -> None:
    stroke = im.make_subject_anatomy(template, np.random.default_rng(11), stroke=True)
    assert stroke.subject.lesion is not None
    with pytest.raises(ValueError, match="lesion"):
        im.render_image("template", stroke, template, synthetic.ARC_PROTOCOL, "T1w", np.random.default_rng(0))
    probs = stroke.probs
    assert "lesion" in probs and np.allclose(sum(probs.values()), 1.0, atol=1e-5)
    image = im.render_image("gmm", stroke, template, synthetic.ARC_PROTOCOL, "FLAIR", np.random.default_rng(0))
    assert np.isfinite(image).all() and image.shape == stroke.subject.labels.shape


def test_physics_path_matches_write_ixi(tmp_path: Path, template: synthetic.Template) -> None:
    """The wiring the IXI writer will use reproduces today's files exactly for the physics model."""
    index, seed = 1, 3
    with ThreadPoolExecutor(max_workers=1) as pool:
        writer = synthetic.PooledWriter(pool)
        name, _ = synthetic.write_ixi(tmp_path, index, template, seed, writer)
        writer.wait()
    rng = synthetic.subject_rng(seed, "ixi", index)
    anatomy = im.make_subject_anatomy(template, rng, stroke=False)
    site = synthetic.SITE_PROTOCOLS[synthetic.IXI_SITES[index % len(synthetic.IXI_SITES)]]
    bias = synthetic.bias_field(template.shape, rng, site.bias_rms)
    for contrast in im.image_contrasts("physics", site):
        image = im.render_image("physics", anatomy, template, site, contrast, rng, bias=bias)
        written = np.asarray(nib.load(str(tmp_path / "ixi" / f"IXI-{contrast}" / f"{name}-{contrast}.nii.gz")).dataobj)
        assert np.array_equal(image, written), contrast


def test_dataset_sites_get_their_image_models(tmp_path: Path) -> None:
    """``generate_dataset(ixi_image_models=...)``: Guys stays physics (identical files), HH gmm, IOP template (T1
    only); labels are the same files whatever the model."""
    kwargs = {"subjects": 3, "seed": 2, "resolution": 6.0, "progress": False}
    plain = synthetic.generate_dataset(tmp_path / "physics", **kwargs)
    mixed = synthetic.generate_dataset(tmp_path / "mixed", ixi_image_models={"HH": "gmm", "IOP": "template"}, **kwargs)
    assert mixed["ixi_image_models"] == {"Guys": "physics", "HH": "gmm", "IOP": "template"}
    guys, hh, iop = plain["ixi_subjects"]
    assert mixed["ixi_subjects"] == plain["ixi_subjects"]

    def load(root: str, sub: str) -> np.ndarray:
        return np.asarray(nib.load(str(tmp_path / root / "ixi" / sub)).dataobj)

    for name in (guys, hh, iop):
        assert np.array_equal(
            load("physics", f"labels/{name}_labels.nii.gz"), load("mixed", f"labels/{name}_labels.nii.gz")
        )
    for contrast in ("T1", "T2", "PD"):
        assert np.array_equal(
            load("physics", f"IXI-{contrast}/{guys}-{contrast}.nii.gz"),
            load("mixed", f"IXI-{contrast}/{guys}-{contrast}.nii.gz"),
        )
        assert not np.array_equal(
            load("physics", f"IXI-{contrast}/{hh}-{contrast}.nii.gz"),
            load("mixed", f"IXI-{contrast}/{hh}-{contrast}.nii.gz"),
        )
    assert (tmp_path / "mixed" / "ixi" / "IXI-T1" / f"{iop}-T1.nii.gz").is_file()
    assert not (tmp_path / "mixed" / "ixi" / "IXI-T2" / f"{iop}-T2.nii.gz").exists()
    with pytest.raises(ValueError, match="Mars"):
        synthetic.generate_dataset(tmp_path / "bad", ixi_image_models={"Mars": "gmm"}, **kwargs)
    with pytest.raises(ValueError, match="photo"):
        synthetic.generate_dataset(tmp_path / "bad", ixi_image_models={"HH": "photo"}, **kwargs)

"""The tissue-aware scorer on template-made FLAIR and T2: a hyperintense lesion in white matter stands out, the
cortex (FLAIR) and the CSF borders (T2) do not, where the plain intensity scorer ranks them with the lesion."""

import numpy as np
import pytest

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, tissue_on_grid
from BrainAnomalyLib.scorers import scorer_class
from BrainAnomalyLib.synth.appearance import healthy_template_scan

GRID = Grid()


def _lesion_case(modality: str, brightness: float):
    """A shifted template scan with a 6 mm-radius sphere in deep white matter, `brightness` white-matter-to-
    grey-matter gaps above the white matter's level."""
    image, mask = healthy_template_scan(modality, seed=5, grid=GRID)
    t = tissue_on_grid(GRID)
    wm_level = float(np.median(image[mask & (t["WM"] > 0.9)]))
    gm_level = float(np.median(image[mask & (t["GM"] > 0.6)]))
    zz, yy, xx = np.indices(mask.shape)
    deep = np.argwhere(mask & (t["WM"] > 0.95))
    centre = deep[len(deep) // 2]
    lesion = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= 3 ** 2
    lesion &= mask
    image = image.copy()
    image[lesion] = wm_level + brightness * abs(gm_level - wm_level)
    return image, mask, lesion, t


def _border(modality: str, mask, lesion, t):
    """The normal tissue that a brain-wide comparison mistakes for lesion: the cortex on FLAIR (brighter than
    white matter), the CSF and its partial-volume borders on T2 (the brightest normal signal)."""
    csf = 1.0 - t["WM"] - t["GM"]
    region = (t["GM"] > 0.5) if modality == "FLAIR" else (csf > 0.3)
    return mask & region & ~lesion


def _scores(kind: str, modality: str, image, mask):
    scorer = scorer_class(kind)({"direction": "hyper"}, {})
    return scorer.score(image, mask, Reporter()).anomaly_map


# A FLAIR lesion a third of the grey-white gap above grey matter: what a brain-wide comparison confuses with cortex.
@pytest.mark.parametrize("modality,brightness", [("FLAIR", 1.3), ("T2", 2.0)])
def test_tissue_scorer_flags_the_lesion_not_the_cortex_or_csf(modality, brightness):
    image, mask, lesion, t = _lesion_case(modality, brightness)
    border = _border(modality, mask, lesion, t)
    assert lesion.sum() > 50 and border.sum() > 1000
    shares = {}
    for kind in ("tissue", "intensity"):
        scores = _scores(kind, modality, image, mask)
        # The cut that keeps most of the lesion: how much of the normal border scores as high?
        cut = float(np.percentile(scores[lesion], 20))
        shares[kind] = float((scores[border] >= cut).mean())
    # Measured: FLAIR 3.6 % of the cortex (tissue) vs 26 % (intensity); T2 0.3 % vs 73 % of the CSF.
    assert shares["tissue"] < 0.05, shares
    assert shares["intensity"] > 4 * shares["tissue"] + 0.1, shares


def test_tissue_scorer_is_blind_to_the_scan_scale():
    image, mask, _, _ = _lesion_case("FLAIR", 2.0)
    a = _scores("tissue", "FLAIR", image, mask)
    b = _scores("tissue", "FLAIR", image * 7.5 + 300.0 * mask, mask)
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert not a[~mask].any()


@pytest.mark.parametrize("name", ["tissue-flair", "tissue-t2", "tissue-t1ce"])
def test_shipped_tissue_models_threshold_a_healthy_scan_at_about_their_rate(name):
    """The default threshold is a calibrated one (no constant), moved onto the scan, and on a synthetic healthy
    scan it leaves no more than a few findings."""
    from BrainAnomalyLib.calibration import choose_threshold
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.store.models import load_model, shipped_registry_file

    model = load_model(shipped_registry_file().parent / name)
    assert "default_threshold" not in model.meta
    det = Detector(model, device="cpu")
    chosen = choose_threshold(model.meta, fpr=0.01)
    assert chosen.fpr == 0.01 and chosen.source.startswith("healthy calibration")
    image, mask = healthy_template_scan(model.modality, seed=99, grid=GRID)  # not one of the calibration seeds
    scores = det.score_grid(image, mask)
    moved = det.for_scan(chosen, scores)
    assert moved.adaptive is not None  # the scan-adaptive move, not the synthetic cohort's raw value
    flagged = float((scores.clean_map[mask] > moved.value).mean())
    assert 0.001 < flagged < 0.03, flagged


@pytest.mark.parametrize("contrast,first",
                         [("T2", r"tissue-t2, intensity-t2"), ("FLAIR", r"tissue-flair, intensity-flair")])
def test_contrast_check_names_the_tissue_model_first(contrast, first):
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.preprocess.contrast import check_contrast
    from BrainAnomalyLib.store.models import list_models

    estimate = {"contrast": contrast, "margin": 3.0, "runner_up": "T1", "margins": {"T1": 3.0}}
    with pytest.raises(BadInputError, match=rf"a {contrast} model \({first}"):
        check_contrast(estimate, "T1", models=list_models, model_name="ensemble-t1-ixi")


def test_a_t1ce_scan_has_a_t1ce_model():
    """The T1CE path: tissue-t1ce takes a scan recognised as T1CE (or as T1, which a healthy T1CE resembles)
    without a note or a refusal, and --modality T1CE is accepted by it."""
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.preprocess.contrast import check_contrast
    from BrainAnomalyLib.store.models import resolve_model

    for seen in ("T1CE", "T1"):
        estimate = {"contrast": seen, "margin": 3.0, "runner_up": "FLAIR", "margins": {"FLAIR": 3.0}}
        notes = check_contrast(estimate, "T1CE", model_name="tissue-t1ce")
        assert len(notes) == (0 if seen == "T1CE" else 1), notes
    assert Detector(resolve_model("tissue-t1ce"), device="cpu").check_modality("t1ce") == "T1CE"


def test_extreme_reference_holds_flair_to_the_brightest_possible_tissue():
    """FLAIR's `extreme` reference: the lesion above every tissue the template allows scores, the cortex (the
    brightest normal tissue where it lies) does not; the scorer's `reference` parameter reaches it."""
    from BrainAnomalyLib.scorers.tissue import extreme_reference_score

    image, mask, lesion, t = _lesion_case("FLAIR", 1.3)
    border = _border("FLAIR", mask, lesion, t)
    scores = extreme_reference_score(image, mask, "hyper", GRID)
    cut = float(np.percentile(scores[lesion], 20))
    assert float((scores[border] >= cut).mean()) < 0.05
    scorer = scorer_class("tissue")({"direction": "hyper", "reference": "extreme"}, {})
    np.testing.assert_array_equal(scorer.score(image, mask, Reporter()).anomaly_map, scores)
    with pytest.raises(ValueError, match="one-sided"):
        extreme_reference_score(image, mask, "two-sided", GRID)


def test_extreme_reference_allows_any_tissue_beyond_the_template_brain():
    """A brain bigger than the template's after the affine fit (or a looser strip): its mask reaches 4 mm past the
    template's brain, where the priors' CSF only means "not GM or WM". Cortex there is no lesion; a signal above
    every tissue still is."""
    from scipy import ndimage

    from BrainAnomalyLib.core.template import brain_mask_on_grid
    from BrainAnomalyLib.scorers.tissue import extreme_reference_score

    image, mask = healthy_template_scan("FLAIR", seed=5, grid=GRID)
    t = tissue_on_grid(GRID)
    gm_level = float(np.median(image[mask & (t["GM"] > 0.6)]))
    wm_level = float(np.median(image[mask & (t["WM"] > 0.9)]))
    rim = ndimage.binary_dilation(mask, iterations=2) & ~brain_mask_on_grid(GRID)
    assert rim.sum() > 1000
    grown, image = mask | rim, image.copy()
    image[rim] = gm_level
    scores = extreme_reference_score(image, grown, "hyper", GRID)
    assert float(np.percentile(scores[rim], 99)) < 0.2
    image[rim] = gm_level + 1.5 * abs(gm_level - wm_level)
    # Measured 1.24. Before, the rim (CSF prior 1) seeded the CSF level itself and scored 0 however bright.
    assert float(np.percentile(extreme_reference_score(image, grown, "hyper", GRID)[rim], 1)) > 0.2
    assert float(np.percentile(extreme_reference_score(image, grown, "hyper", GRID, blur_mm=0.0)[rim], 1)) > 0.2


def test_thick_slices_widen_the_extreme_reference_only_across_them():
    """A healthy FLAIR acquired in 8 mm slices and registered 6 mm off across them: held to the CSF level, the
    tissue blurred into the ventricles' roofs scores as lesion; with the acquisition's slice extent the priors widen
    along z and those false alarms go. Inputs no coarser than the grid score exactly as without it."""
    from scipy import ndimage

    from BrainAnomalyLib.scorers.tissue import extreme_reference_score

    image, mask = healthy_template_scan("FLAIR", seed=5, grid=GRID)
    fwhm_voxels = 8.0 / GRID.spacing[2]
    thick = ndimage.shift(ndimage.gaussian_filter(image, [fwhm_voxels / 2.3548, 0, 0]), [3, 0, 0], order=1,
                          mode="nearest")
    plain = extreme_reference_score(thick, mask, "hyper", GRID)
    np.testing.assert_array_equal(extreme_reference_score(thick, mask, "hyper", GRID, acquisition_mm=[2, 1, 1]),
                                  plain)
    widened = extreme_reference_score(thick, mask, "hyper", GRID, acquisition_mm=[8, 2, 2])
    # Measured: 0.112 % of the brain above 1 IQR without, 0.008 % with.
    assert float((plain[mask] > 1.0).mean()) > 4 * float((widened[mask] > 1.0).mean()) + 2e-4
    scorer = scorer_class("tissue")({"direction": "hyper", "reference": "extreme"}, {})
    scorer.acquisition_mm = [8, 2, 2]
    np.testing.assert_array_equal(scorer.score(thick, mask, Reporter()).anomaly_map, widened)


def test_detection_on_thick_slices_keeps_scores_off_the_brain_ends_across_them():
    """The detector erodes the scored region across thick slices by the slab's excess (postprocess.slab_voxels):
    with 8.3 mm slices on the 2 mm grid, three grid slices off the brain's top and bottom; 1 mm input, none."""
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.store.models import load_model, shipped_registry_file

    det = Detector(load_model(shipped_registry_file().parent / "tissue-flair"), device="cpu")
    image, mask = healthy_template_scan("FLAIR", seed=5, grid=GRID)
    native = det.score_grid(image, mask, acquisition_mm=[1.0, 1.0, 1.0])
    np.testing.assert_array_equal(native.scoring_mask, det.score_grid(image, mask).scoring_mask)
    thick = det.score_grid(image, mask, acquisition_mm=[8.3, 1.0, 1.0])
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    kept = np.flatnonzero(thick.scoring_mask.any(axis=(1, 2)))
    assert kept.min() >= slices.min() + 3 and kept.max() <= slices.max() - 3
    assert not thick.clean_map[~thick.scoring_mask].any() and thick.clean_map[thick.scoring_mask].any()


def test_voxel_extent_on_grid_follows_the_slices_through_the_registration():
    """A 1 x 1 x 5 mm axial scan reaches 5 mm along the grid's z axis; scaled by the registration, by as much
    more; turned by 90 degrees about x, the thick axis lies along the grid's y instead."""
    import SimpleITK as sitk

    from BrainAnomalyLib.preprocess.chain import voxel_extent_on_grid

    scan = sitk.Image([20, 20, 8], sitk.sitkFloat32)
    scan.SetSpacing([1.0, 1.0, 5.0])
    identity = sitk.AffineTransform(3)
    np.testing.assert_allclose(voxel_extent_on_grid(scan, identity, GRID), [5, 1, 1], atol=1e-6)
    shrink = sitk.AffineTransform(3)
    shrink.SetMatrix([0.5, 0, 0, 0, 0.5, 0, 0, 0, 0.5])  # template -> scan: the scan's brain is half the size
    np.testing.assert_allclose(voxel_extent_on_grid(scan, shrink, GRID), [10, 2, 2], atol=1e-6)
    scan.SetDirection([1, 0, 0, 0, 0, -1, 0, 1, 0])
    np.testing.assert_allclose(voxel_extent_on_grid(scan, identity, GRID), [1, 5, 1], atol=1e-6)

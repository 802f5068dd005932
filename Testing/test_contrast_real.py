"""Contrast recognition on the real brats18_dev volumes (skipped when ../shared/data is absent).

The full preprocessing of 20 volumes costs many minutes, so this takes a cheaper path to the template grid: the
pipeline's own registration (preprocess.register) of each subject's T1 at 4 mm (about 1.5 s; within 2.6-4.4 mm of
the full registration at every probe point), applied to all four of its contrasts, which BraTS co-registers; no
bias correction. That placement is rougher than the pipeline's (the bias field of one BraTS FLAIR alone moves its
grey-white gap by 0.37 IQR), so the test asks for what must hold on any scan: T1, T1CE and T2 recognised with a
margin, a FLAIR never confidently taken for T1, and nothing but T1 and T1CE let into a T1 model. The full
pipeline's numbers (all 20 volumes and the 153 IXI scans) are in the README
(scripts/contrast_confusion.py).
"""

from collections import defaultdict

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.core.manifest import read_manifest
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid
from BrainAnomalyLib.preprocess.contrast import MIN_MARGIN, check_contrast, compatible, estimate_contrast
from BrainAnomalyLib.preprocess.register import register_affine

from conftest import SHARED_DATA, needs_shared_data

COARSE = 2  # the 2 mm grid's template shrunk to 4 mm


def _register_coarse(scan: sitk.Image, grid: Grid) -> sitk.Transform:
    fixed = sitk.Shrink(template_on_grid(grid), [COARSE] * 3)
    fixed_mask = sitk.GetArrayFromImage(
        sitk.Shrink(sitk.GetImageFromArray(brain_mask_on_grid(grid).astype(np.uint8)), [COARSE] * 3)) > 0
    factor = [max(1, round(4.0 / s)) for s in scan.GetSpacing()]
    moving = sitk.Shrink(scan, factor)
    transform, _ = register_affine(moving, sitk.GetArrayFromImage(moving) > 0, fixed, fixed_mask, Reporter(),
                                   iterations=60)
    return transform


@pytest.fixture(scope="module")
def brats_estimates():
    grid = Grid()
    ref = grid.reference()
    subjects = defaultdict(dict)
    for case in read_manifest(SHARED_DATA / "brats18_dev.csv"):
        subjects[case.subject][case.modality] = sitk.ReadImage(str(case.image), sitk.sitkFloat32)
    out = {}
    for subject, scans in subjects.items():
        placement = _register_coarse(scans["T1"], grid)
        for modality, scan in scans.items():
            on_grid = sitk.GetArrayFromImage(sitk.Resample(scan, ref, placement, sitk.sitkLinear, 0.0))
            brain = sitk.GetArrayFromImage(sitk.Resample(scan > 0, ref, placement, sitk.sitkNearestNeighbor)) > 0
            out[(subject, modality)] = estimate_contrast(on_grid, brain, grid)
    return out


@needs_shared_data("brats18_dev.csv")
def test_brats_contrasts_are_recognised_even_on_a_rough_placement(brats_estimates):
    assert len(brats_estimates) == 20
    wrong = {}
    for (subject, modality), est in brats_estimates.items():
        if modality == "FLAIR":
            # without bias correction a FLAIR's grey-white order can sit near the T1 boundary: it may come out
            # unclear, never as a confident T1 or T1CE
            ok = est.contrast == "FLAIR" or est.margins["FLAIR"] < MIN_MARGIN
        else:
            ok = compatible(est.contrast, modality) and est.margin >= MIN_MARGIN
        if not ok:
            wrong[(subject, modality)] = (est.contrast, round(est.margin, 3))
    assert not wrong


@needs_shared_data("brats18_dev.csv")
def test_brats_flair_and_t2_never_pass_into_a_t1_model_and_t1_does(brats_estimates):
    for (subject, modality), est in brats_estimates.items():
        if modality in ("T1", "T1CE"):
            check_contrast(est.to_dict(), "T1")  # T1CE: a note at most
        else:
            with pytest.raises(BadInputError, match="for T1 scans"):
                check_contrast(est.to_dict(), "T1")

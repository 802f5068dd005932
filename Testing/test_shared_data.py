"""Real scans from ../shared/data (skipped when it is absent): deepbet + registration on a full head, and
detection on a BraTS case with the shipped normative model."""

import SimpleITK as sitk

from BrainAnomalyLib.evaluation.metrics import average_precision
from BrainAnomalyLib.core.io import read_volume, same_geometry
from BrainAnomalyLib.core.manifest import read_manifest
from BrainAnomalyLib.store.models import resolve_model
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.preprocess.chain import PreprocessConfig, preprocess
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid

from conftest import SHARED_DATA, needs_shared_data


@needs_shared_data("ixi_t1_2mm.csv")
def test_full_head_is_stripped_and_registered_to_the_template():
    case = read_manifest(SHARED_DATA / "ixi_t1_2mm.csv")[0]
    steps = []
    pre = preprocess(read_volume(case.image), PreprocessConfig(), Grid(), False,
                     Reporter(lambda s, f: steps.append((s, f))))
    strip = pre.record[1]
    assert strip["method"] == "deepbet" and not strip["looked_stripped"]
    assert 900 < strip["brain_ml"] < 2000
    template = brain_mask_on_grid(Grid())
    overlap = 2 * (pre.mask & template).sum() / (pre.mask.sum() + template.sum())
    assert overlap > 0.9
    fractions = [f for _, f in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"register", "bias-correct"} <= {s for s, _ in steps}


@needs_shared_data("brats18_dev.csv")
def test_brats_case_scored_on_its_own_grid_better_than_chance():
    case = read_manifest(SHARED_DATA / "brats18_dev.csv", "T1")[0]
    scan = read_volume(case.image)
    result = Detector(resolve_model("normative-t1-ixi"), device="cpu").run(scan, modality="T1")
    assert result.preprocessing[1]["looked_stripped"]  # BraTS is skull-stripped: deepbet is skipped
    assert same_geometry(result.anomaly_map, scan) and same_geometry(result.pred_mask, scan)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
    brain = sitk.GetArrayFromImage(result.brain_mask) > 0
    heat = sitk.GetArrayFromImage(result.anomaly_map)
    prevalence = truth[brain].mean()
    assert average_precision(heat[brain], truth[brain]) > 2 * prevalence

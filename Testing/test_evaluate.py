"""`brainanomaly evaluate` end to end on template-made cases: metrics, report files, healthy FPR, scan AUROC."""

import json

import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.synth.demo import make_demo_case
from BrainAnomalyLib.core.manifest import Case, write_manifest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    cases = []
    specs = [("les1", 0.5, (24.0, 10.0, 24.0), 0), ("les2", 0.45, (-26.0, -20.0, 18.0), 1),
             ("healthy1", 1.0, (24.0, 10.0, 24.0), 2)]
    for name, contrast, centre, seed in specs:
        scan, truth = make_demo_case(spacing=(2.0, 2.0, 2.0), contrast=contrast, centre_ras=centre, seed=seed,
                                     motion_deg=(3.0, -2.0, 4.0 * (seed - 1)), radius_mm=9.0)
        sitk.WriteImage(scan, str(folder / f"{name}.nii.gz"))
        mask = None
        if contrast < 1.0:
            sitk.WriteImage(truth, str(folder / f"{name}_mask.nii.gz"))
            mask = folder / f"{name}_mask.nii.gz"
        cases.append(Case(name, "T1", folder / f"{name}.nii.gz", mask))
    write_manifest(folder / "lesions.csv", [c for c in cases if c.mask is not None])
    write_manifest(folder / "healthy.csv", [c for c in cases if c.mask is None])
    return folder


# In the test process: a pool of worker processes (the default on a machine of several cores) spends seconds
# importing in each; that worker processes give the numbers of one process is test_cohort's test.
ONE_PROCESS = ("--workers", "1")


def _without_n4(model, folder):
    """A copy of `model` whose preprocessing skips N4: the template-made scans have no bias field, and what these
    tests check is evaluation, not N4 (test_cli runs it in a detection)."""
    import shutil

    copy = shutil.copytree(model.path, folder / model.path.name)
    meta = json.loads((copy / "model.json").read_text(encoding="utf-8"))
    meta["preprocessing"] = dict(meta["preprocessing"], bias_correction=False)
    (copy / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return copy


def test_evaluate_compares_models_and_writes_the_report(cohort, tmp_path, template_normative_model,
                                                        intensity_model, capsys):
    out = tmp_path / "report"
    code = main(["evaluate", "--manifest", str(cohort / "lesions.csv"), "--healthy", str(cohort / "healthy.csv"),
                 "--model", str(_without_n4(template_normative_model, tmp_path)),
                 "--model", str(_without_n4(intensity_model, tmp_path)), "--device", "cpu", *ONE_PROCESS,
                 "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    norm, inten = metrics["template-normative"], metrics["test-intensity"]
    assert norm["n_lesion_scans"] == 2 and norm["n_healthy_scans"] == 1
    assert norm["voxel"]["auprc"] > 0.5 and norm["voxel"]["auprc"] > inten["voxel"]["auprc"]
    assert norm["voxel"]["best_dice_upper_bound"] >= norm["voxel"]["dice_at_threshold"]
    assert norm["lesion"]["sensitivity"] == 1.0 and norm["lesion"]["true_lesions"] == 2
    assert 0 <= norm["healthy_fpr"] < 0.05 and 0 <= norm["nonlesion_fpr"] < 0.05
    assert norm["scan"]["auroc"] == 1.0  # both lesion scans score above the healthy one
    assert norm["threshold"]["fpr"] == 0.01 and inten["threshold"]["source"].startswith("model default")
    assert 0 <= norm["voxel"]["mood_ap"] <= 1
    assert len(norm["per_case"]) == 3 and norm["seconds_per_volume"] > 0
    # each lesion scan's single tumour is hit, so the patient rates match the lesion sensitivity
    assert norm["patient"]["patients"] == 2 and norm["patient"]["patient_rate"] == 1.0
    assert norm["patient"]["largest_rate"] == 1.0
    assert norm["false_findings"]["per_healthy_scan"] == norm["per_case"][2]["n_pred_lesions"]
    assert (out / "froc.png").is_file() and "patient detection" in (out / "metrics.md").read_text(encoding="utf-8")
    for name in ("metrics.md", "pr_curves.png", "template-normative_best.png", "template-normative_worst.png"):
        assert (out / name).is_file(), name
    table = (out / "metrics.md").read_text(encoding="utf-8")
    assert "| template-normative |" in table and "| test-intensity |" in table


def test_evaluate_rejects_models_of_different_modalities(cohort, tmp_path, template_normative_model, capsys):
    import shutil

    flair = tmp_path / "flair-model"
    shutil.copytree(template_normative_model.path, flair)
    meta = json.loads((flair / "model.json").read_text(encoding="utf-8"))
    meta["modality"], meta["name"] = "FLAIR", "flair-copy"
    (flair / "model.json").write_text(json.dumps(meta))
    code = main(["evaluate", "--manifest", str(cohort / "lesions.csv"), "--model",
                 str(template_normative_model.path), "--model", str(flair), "-o", str(tmp_path / "o"), "-q"])
    assert code == 2 and "different modalities" in capsys.readouterr().err


def test_evaluate_refuses_two_models_of_the_same_name(cohort, tmp_path, template_normative_model, capsys):
    """Results are keyed by model name, so two folders of one name would silently show as one row."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(template_normative_model.path, twin)
    code = main(["evaluate", "--manifest", str(cohort / "lesions.csv"), "--model",
                 str(template_normative_model.path), "--model", str(twin), "-o", str(tmp_path / "o"), "-q"])
    assert code == 2 and "named" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_findings_match_detects_lesion_table():
    """evaluate re-labels maps for the FROC sweep with postprocess.findings; they must be detect's lesion-table rows
    exactly."""
    import numpy as np
    from scipy import ndimage

    from BrainAnomalyLib.detection.postprocess import findings, label_lesions

    rng = np.random.default_rng(5)
    arr = ndimage.gaussian_filter(rng.random((40, 44, 36)), 1.5).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.5, 1.2, 2.0))
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    for threshold in np.quantile(arr, [0.8, 0.9, 0.97]):
        label_map, table = label_lesions(image, float(threshold), 0.03, numbered=True)
        ours = findings(arr > threshold, voxel_ml, 0.03)
        assert len(table) > 1 and len(np.unique(ours[ours > 0])) == len(table)
        assert np.array_equal(ours > 0, sitk.GetArrayFromImage(label_map) > 0)
        dropped = ndimage.label(arr > threshold, ndimage.generate_binary_structure(3, 3))[1] - len(table)
        assert dropped > 0  # the minimum-volume rule was exercised


def _scan(blobs, truth_boxes=(), shape=(24, 24, 24)):
    import numpy as np

    heat = np.zeros(shape, np.float32)
    for box, value in blobs:
        heat[box] = value
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    heat[~brain] = 0
    truth = np.zeros(shape, bool)
    for box in truth_boxes:
        truth[box] = True
    return heat, brain, truth


def test_froc_sweep_on_hand_made_scans():
    import numpy as np

    from BrainAnomalyLib.evaluation.evaluate import scan_map, sweep, truth_components
    from BrainAnomalyLib.evaluation.metrics import froc

    s = np.s_
    voxel_ml, min_ml = 0.001, 0.002  # 1 mm voxels; a single voxel is too small to be a finding
    # lesion scan: a tumour in two parts (the larger scores 5, the smaller 3), a false blob scoring 3, a lone
    # voxel scoring 9 (dropped as too small), and truth partly outside the brain
    heat, brain, truth = _scan([(s[4:8, 4:8, 4:8], 5.0), (s[12:14, 4:6, 4:6], 3.0), (s[16:19, 16:19, 16:19], 3.0),
                                (s[10, 18, 4], 9.0)], [s[0:8, 4:8, 4:8], s[12:14, 4:6, 4:6]])
    t_lab, t_sizes = truth_components(truth)
    lesion = scan_map(heat, brain, t_lab, t_sizes, voxel_ml, min_ml)
    # healthy scan: one blob scoring 4
    h_heat, h_brain, _ = _scan([(s[6:9, 6:9, 6:9], 4.0)])
    healthy = scan_map(h_heat, h_brain, None, None, voxel_ml, min_ml)
    thresholds = [8.0, 4.5, 3.5, 2.0, 0.0]
    curve = froc(thresholds, [sweep(lesion, thresholds), sweep(healthy, thresholds)], [False, True])
    assert curve["patient_rate"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert curve["largest_rate"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert curve["lesion_sensitivity"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert curve["false_findings_per_lesion_scan"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert curve["false_findings_per_healthy_scan"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    # the largest component is the one reaching outside the brain: 8 x 4 x 4 voxels, not its in-brain part
    assert lesion.truth_sizes.tolist() == [128, 8]


def test_froc_sensitivity_never_falls_as_the_threshold_drops():
    import numpy as np
    from scipy import ndimage

    from BrainAnomalyLib.evaluation.evaluate import scan_map, sweep, truth_components
    from BrainAnomalyLib.evaluation.metrics import froc, sweep_thresholds

    rng = np.random.default_rng(11)
    maps, healthy = [], []
    for i in range(4):
        noise = ndimage.gaussian_filter(rng.random((30, 30, 30)), 1.2).astype(np.float32)
        brain = np.zeros(noise.shape, bool)
        brain[3:-3, 3:-3, 3:-3] = True
        truth = None
        if i < 3:
            truth = np.zeros(noise.shape, bool)
            truth[8 + 3 * i:14 + 3 * i, 8:16, 10:15] = True
            truth[20:23, 20:22, 6 + i:9 + i] = True
            noise[truth] += 0.03 * (i + 1)
        t_lab, t_sizes = truth_components(truth) if truth is not None else (None, None)
        maps.append(scan_map(np.where(brain, noise, 0), brain, t_lab, t_sizes, 0.001, 0.003))
        healthy.append(truth is None)
    thresholds = sweep_thresholds(np.concatenate([m.values for m in maps]), (0.3, 0.1, 0.03, 0.01, 0.001))
    curve = froc(thresholds, [sweep(m, thresholds) for m in maps], healthy)
    assert list(thresholds) == sorted(thresholds, reverse=True)
    for key in ("patient_rate", "largest_rate", "lesion_sensitivity"):
        assert all(a <= b for a, b in zip(curve[key], curve[key][1:])), (key, curve[key])
    assert curve["patient_rate"][-1] == 1.0 and curve["lesion_sensitivity"][0] < 1.0


def test_evaluate_froc_reproduces_the_operating_point(cohort, tmp_path, template_normative_model, capsys):
    """With one cohort threshold for every scan, the sweep's row at that threshold re-labels the kept maps and
    must give exactly what the detect path's label maps gave."""
    out = tmp_path / "report"
    code = main(["evaluate", "--manifest", str(cohort / "lesions.csv"), "--healthy", str(cohort / "healthy.csv"),
                 "--model", str(_without_n4(template_normative_model, tmp_path)), "--calibration", "cohort",
                 "--device", "cpu", *ONE_PROCESS, "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["template-normative"]
    curve = m["froc"]
    k = curve["threshold"].index(m["threshold"]["value"])
    assert curve["patient_rate"][k] == m["patient"]["patient_rate"] == 1.0
    assert curve["largest_rate"][k] == m["patient"]["largest_rate"]
    assert curve["lesion_sensitivity"][k] == m["lesion"]["sensitivity"]
    assert curve["false_findings_per_healthy_scan"][k] == m["false_findings"]["per_healthy_scan"]
    assert curve["false_findings_per_lesion_scan"][k] == m["false_findings"]["per_lesion_scan"]
    rows = {r["case"]: r for r in m["per_case"]}
    assert m["false_findings"]["per_healthy_scan"] == rows["healthy1_T1"]["n_pred_lesions"]
    assert all(rows[c]["patient_found"] for c in ("les1_T1", "les2_T1"))
    assert len(curve["threshold"]) >= 5 and (out / "froc.png").is_file()
    assert "### FROC: template-normative" in (out / "metrics.md").read_text(encoding="utf-8")

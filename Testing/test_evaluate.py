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


def test_evaluate_compares_models_and_writes_the_report(cohort, tmp_path, template_normative_model,
                                                        intensity_model, capsys):
    out = tmp_path / "report"
    code = main(["evaluate", "--manifest", str(cohort / "lesions.csv"), "--healthy", str(cohort / "healthy.csv"),
                 "--model", str(template_normative_model.path), "--model", str(intensity_model.path),
                 "--device", "cpu", "-o", str(out), "-q"])
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

"""The README's first command: `brainanomaly demo` with the shipped default model finds the inserted lesion."""

import json

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.store.models import default_model_name


def test_demo_ranks_the_inserted_lesion_first_with_the_default_model(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "-q"]) == 0
    assert "demo lesion: found as finding #1 of" in capsys.readouterr().out
    summary = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert summary["model"]["name"] == default_model_name()
    # the lesion-level operating point: at most 0.5 false findings per healthy scan, cut at the 1 % voxel FPR
    assert summary["threshold"]["false_findings"] == 0.5 and summary["threshold"]["fpr"] == 0.01
    assert all(les["healthy_rate"] <= 0.5 for les in summary["lesions"])
    truth_img = sitk.ReadImage(str(tmp_path / "demo_truth.nii.gz"))
    truth = sitk.GetArrayFromImage(truth_img) > 0
    centre = np.array(truth_img.TransformContinuousIndexToPhysicalPoint(
        np.argwhere(truth).mean(axis=0)[::-1].tolist())) * [-1, -1, 1]
    top = summary["lesions"][0]
    assert np.linalg.norm(np.array(top["centroid_ras"]) - centre) < 5.0
    true_ml = truth.sum() * np.prod(truth_img.GetSpacing()) / 1000
    # The default's rms fusion puts each member on the scan's own spread; a template-made scan has almost none, so the
    # lesion's rim comes in too: 6.6 mL drawn around the 3.2 mL lesion (all of it; Dice 0.66), as the README says.
    assert 0.5 * true_ml < top["volume_ml"] < 2.5 * true_ml
    # the rarest finding in healthy scans, and clearly separated from anything else reported
    assert top["healthy_rate"] == min(les["healthy_rate"] for les in summary["lesions"])
    assert all(les["max_score"] < 0.5 * top["max_score"] for les in summary["lesions"][1:])
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred_mask.nii.gz"))) > 0
    assert pred[truth].mean() > 0.7  # most of the inserted lesion is labelled
    assert (tmp_path / "overlay.png").stat().st_size > 10_000

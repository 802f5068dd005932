"""scripts/slicer_batch.py run as a program (plain Python with slicer-core instead of Slicer's launcher): everything
but the Slicer start-up."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, new_scene

from BrainAnomalyLib.detection.postprocess import LESION_COLUMN_NAMES
from BrainAnomalyLib.detection.writers import output_names

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

SCRIPT = ROOT / "scripts" / "slicer_batch.py"


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout)


def test_batch_writes_every_output_and_reports_failures(tmp_path, demo_case):
    scan, truth = demo_case
    sitk.WriteImage(scan, str(tmp_path / "demo.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("subject,modality,image,mask\ndemo,T1,demo.nii.gz,\nbroken,T1,broken.nii.gz,\n"
                        "flair,FLAIR,demo.nii.gz,\n")
    out = tmp_path / "out"
    proc = _run("--manifest", manifest, "-o", out, "--device", "cpu")
    assert proc.returncode == 1, proc.stderr  # one case failed
    assert "1 of 2 cases done" in proc.stdout and "failed: broken" in proc.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["subject"], r["status"]) for r in rows] == [("demo", "ok"), ("broken", "failed")]  # T1 rows only
    assert "broken.nii.gz" in rows[1]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["demo", "summary.csv"]  # nothing half-written for "broken"
    case = out / "demo"
    assert sorted(p.name for p in case.iterdir()) == sorted(output_names("nrrd"))  # what detect writes
    result = json.loads((case / "result.json").read_text(encoding="utf-8"))
    assert int(rows[0]["n_lesions"]) == len(result["lesions"]) > 0
    assert result["threshold"]["fpr"] == pytest.approx(0.01)
    # Maps on the input grid, the inserted lesion in the label map.
    for name in ("anomaly_map.nrrd", "pred_mask.nrrd"):
        img = sitk.ReadImage(str(case / name))
        assert img.GetSize() == scan.GetSize()
        assert np.allclose(img.GetOrigin(), scan.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetDirection(), scan.GetDirection(), atol=1e-5)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "pred_mask.nrrd"))) > 0
    assert labels[sitk.GetArrayFromImage(truth) > 0].mean() > 0.3
    # The lesion table loads back into a Slicer table node with one row per lesion, in the one schema.
    scene = new_scene()
    table = scene.AddNewNodeByClass("vtkMRMLTableNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    storage.SetFileName(str(case / "lesions.csv"))
    assert storage.ReadData(table)
    t = table.GetTable()
    assert t.GetNumberOfRows() == len(result["lesions"])
    assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == list(LESION_COLUMN_NAMES)
    assert float(t.GetValueByName(0, "max_score").ToString()) == result["lesions"][0]["max_score"]


def test_batch_argument_and_model_errors(tmp_path):
    proc = _run("--model", "x")
    assert proc.returncode == 2 and "--manifest" in proc.stderr
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,modality,image,mask\na,T1,a.nii.gz,\n")
    proc = _run("--manifest", manifest, "-o", tmp_path / "o", "--model", "no-such-model")
    assert proc.returncode == 3 and "no model named 'no-such-model'" in proc.stderr
    proc = _run("--manifest", manifest, "-o", tmp_path / "o", "--modality", "FLAIR")
    assert proc.returncode == 2 and "no rows with modality FLAIR" in proc.stderr

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
    proc = _run("--manifest", manifest, "-o", out, "--device", "cpu", "--per-lesion-segments")
    assert proc.returncode == 1, proc.stderr  # one case failed
    assert "1 of 2 cases done" in proc.stdout and "failed: broken" in proc.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["subject"], r["status"]) for r in rows] == [("demo", "ok"), ("broken", "failed")]  # T1 rows only
    assert "broken.nii.gz" in rows[1]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["demo", "summary.csv"]  # nothing half-written for "broken"
    case = out / "demo"
    assert {p.name for p in case.iterdir()} >= {"anomaly_map.nrrd", "labels.nrrd", "anomalies.seg.nrrd",
                                                "lesions.csv", "result.json"}
    result = json.loads((case / "result.json").read_text(encoding="utf-8"))
    assert int(rows[0]["n_lesions"]) == len(result["lesions"]) > 0
    assert result["fpr"] == pytest.approx(0.01) and result["device"] == "cpu"  # the device that really ran
    # Maps on the input grid, the inserted lesion in the label map.
    for name in ("anomaly_map.nrrd", "labels.nrrd"):
        img = sitk.ReadImage(str(case / name))
        assert img.GetSize() == scan.GetSize()
        assert np.allclose(img.GetOrigin(), scan.GetOrigin(), atol=1e-4)
        assert np.allclose(img.GetDirection(), scan.GetDirection(), atol=1e-5)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labels.nrrd"))) > 0
    assert labels[sitk.GetArrayFromImage(truth) > 0].mean() > 0.3
    # The table and the segmentation load back with one row / one segment per lesion.
    with open(case / "lesions.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(result["lesions"])
    assert float(table[0]["Peak score"]) == pytest.approx(result["lesions"][0]["max_score"], rel=1e-4)
    scene = new_scene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(case / "anomalies.seg.nrrd"))
    assert storage.ReadData(seg)
    assert seg.GetSegmentation().GetNumberOfSegments() == len(result["lesions"])


def test_batch_argument_and_model_errors(tmp_path):
    proc = _run("--model", "x")
    assert proc.returncode == 2 and "--manifest" in proc.stderr
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,modality,image,mask\na,T1,a.nii.gz,\n")
    proc = _run("--manifest", manifest, "-o", tmp_path / "o", "--model", "no-such-model")
    assert proc.returncode == 3 and "no model named 'no-such-model'" in proc.stderr
    proc = _run("--manifest", manifest, "-o", tmp_path / "o", "--modality", "FLAIR")
    assert proc.returncode == 2 and "no rows with modality FLAIR" in proc.stderr


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slicer_batch_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_application(monkeypatch):
    """A stand-in for the Slicer application's `slicer` module: only what the script touches."""
    import types

    exits = []
    fake = types.ModuleType("slicer")
    fake.app = object()
    fake.util = types.SimpleNamespace(exit=exits.append)
    monkeypatch.setitem(sys.modules, "slicer", fake)
    return fake, exits


def test_inside_slicer_an_uncaught_error_still_quits_the_application(monkeypatch):
    script = _script_module()
    _, exits = _fake_application(monkeypatch)

    def broken(argv):
        raise RuntimeError("a bug")

    monkeypatch.setattr(script, "main", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        script.run([])
    assert exits == [1]  # without it a window-less Slicer would run on forever
    monkeypatch.setattr(script, "main", lambda argv: 0)
    assert script.run([]) == 0 and exits == [1, 0]


def test_inside_slicer_the_dependencies_are_installed_without_asking(monkeypatch):
    from BrainAnomalySlicer import dependencies

    script = _script_module()
    fake, _ = _fake_application(monkeypatch)
    calls = []
    monkeypatch.setattr(dependencies, "slicer_installers", lambda: ("torch-installer", "pip-installer"))
    monkeypatch.setattr(dependencies, "ensure_dependencies", lambda *args: calls.append(args) or True)
    script._install_dependencies(fake, print)
    (progress, confirm, torch_installer, pip_installer), = calls
    assert confirm is None and (torch_installer, pip_installer) == ("torch-installer", "pip-installer")
    script._install_dependencies(slicer, print)  # the slicer-core wheel: no application, nothing installed
    assert len(calls) == 1


def test_case_written_again_keeps_its_files_when_a_write_fails(mrml_scene, worker_output, tmp_path, monkeypatch):
    """A case folder rewritten (a batch run again into the same OUTDIR) with the third of its five files failing:
    the previous files stay, byte for byte, and nothing half-written is left beside them."""
    import shutil

    from BrainAnomalySlicer import batch, nodes
    from BrainAnomalySlicer.logic import DetectionError, DetectionLogic, DetectionOptions

    scan = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(scan, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    shutil.copytree(worker_output / "out", tmp_path / "worker")
    logic = DetectionLogic(mrml_scene)
    outputs = logic.load_outputs(scan, tmp_path / "worker", DetectionOptions())
    result = logic.apply_threshold(outputs)
    case = tmp_path / "out" / "demo"
    batch.save_case(mrml_scene, outputs, logic.state(outputs), result["lesions"], case)
    before = {p.name: p.read_bytes() for p in case.iterdir()}
    assert set(before) >= set(batch.CASE_FILES)

    real, calls = batch._write, []

    def third_write_fails(scene, node, storage_class, path):
        calls.append(path.name)
        if len(calls) == 3:
            path.write_bytes(b"NRRD0004\n")  # a partial file, as a crash would leave it
            raise DetectionError(f"could not write {path.name}")
        return real(scene, node, storage_class, path)

    monkeypatch.setattr(batch, "_write", third_write_fails)
    stricter = logic.apply_threshold(outputs, fpr=0.001)
    with pytest.raises(DetectionError, match="anomalies.seg.nrrd"):
        batch.save_case(mrml_scene, outputs, logic.state(outputs), stricter["lesions"], case)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in case.iterdir()} == before
    assert [p.name for p in case.parent.iterdir()] == ["demo"]
    assert json.loads((case / "result.json").read_text(encoding="utf-8"))["lesions"] == result["lesions"]
    img = sitk.ReadImage(str(case / "anomaly_map.nrrd"))  # still a whole, readable volume
    assert img.GetSize() == sitk.ReadImage(str(worker_output / "scan.nrrd")).GetSize()

    # Every file written, then the swap's second rename refused (a file in the old folder held open elsewhere):
    # the old folder is put back.
    import os

    from BrainAnomalyLib.core import files

    real_replace, renames = os.replace, []

    def swap_fails(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise PermissionError("in use")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", swap_fails)
    with pytest.raises(PermissionError):
        batch.save_case(mrml_scene, outputs, logic.state(outputs), stricter["lesions"], case)
    monkeypatch.undo()
    assert len(renames) == 3 and {p.name: p.read_bytes() for p in case.iterdir()} == before
    assert [p.name for p in case.parent.iterdir()] == ["demo"]

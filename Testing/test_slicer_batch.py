"""scripts/slicer_batch.py run as a program (plain Python with slicer-core instead of Slicer's launcher): everything
but the Slicer start-up."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

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


def test_batch_writes_every_output_and_reports_failures(tmp_path, coarse_demo_case, calibrated_template_model):
    scan, truth = coarse_demo_case
    sitk.WriteImage(scan, str(tmp_path / "demo.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    manifest = tmp_path / "cases.csv"
    manifest.write_text("subject,modality,image,mask\ndemo,T1,demo.nii.gz,\nbroken,T1,broken.nii.gz,\n"
                        "flair,FLAIR,demo.nii.gz,\n")
    out = tmp_path / "out"
    # at a number of false findings per healthy scan other than the default 0.5 (passed through to each case); a
    # calibrated template model, as what is tested is the batch, not the default model (N4 off: its option)
    model = ("--model", calibrated_template_model.path, "--no-bias-correction")
    proc = _run("--manifest", manifest, "-o", out, "--device", "cpu", "--false-findings", "5", *model)
    assert proc.returncode == 1, proc.stderr  # one case failed
    assert "1 of 2 cases done" in proc.stdout and "failed: broken" in proc.stderr
    assert "skipped 1 of 3 rows: modality FLAIR, this batch is for T1" in proc.stdout
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["subject"], r["status"]) for r in rows] == [("flair", "skipped"), ("demo", "ok"), ("broken", "failed")]
    assert "broken.nii.gz" in rows[2]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["demo", "summary.csv"]  # nothing half-written for "broken"
    again = _run("--manifest", manifest, "-o", out, "--device", "cpu", *model)  # an earlier run: refused first
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr
    case = out / "demo"
    assert sorted(p.name for p in case.iterdir()) == sorted(output_names("nrrd"))  # what detect writes
    result = json.loads((case / "result.json").read_text(encoding="utf-8"))
    assert int(rows[1]["n_lesions"]) == len(result["lesions"]) > 0
    assert float(rows[1]["false_findings"]) == result["threshold"]["false_findings"] == 5.0
    rates = [les["healthy_rate"] for les in result["lesions"]]
    assert all(r <= 5.0 for r in rates) and rates == sorted(rates)
    assert result["threshold"]["fpr"] == pytest.approx(0.01) and result["device"] == "cpu"  # the device that really ran
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


def test_batch_argument_and_model_errors(tmp_path, capsys):
    """The script's main() in this process: its exit codes are what the program exits with (the test above runs it
    as a program), without a Python start-up per refusal."""
    script = _script_module()

    def run(*args):
        code = script.main([str(a) for a in args])
        return code, capsys.readouterr().err

    code, err = run("--manifest", tmp_path / "m.csv", "-o", tmp_path / "o", "--fpr", "0.01", "--false-findings", "5")
    assert code == 2 and "not allowed with" in err
    code, err = run("--model", "x")
    assert code == 2 and "--manifest" in err
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,modality,image,mask\na,T1,a.nii.gz,\n")
    code, err = run("--manifest", manifest, "-o", tmp_path / "o", "--model", "no-such-model")
    assert code == 3 and "no model named 'no-such-model'" in err
    code, err = run("--manifest", manifest, "-o", tmp_path / "o", "--modality", "FLAIR")
    assert code == 2 and "no rows with modality FLAIR" in err


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


def test_case_written_again_keeps_its_files_when_a_write_fails(worker_output, tmp_path, monkeypatch):
    """A case folder rewritten (a batch run again into the same OUTDIR) with the third of its volume writes failing
    halfway: the previous files stay, byte for byte, and nothing half-written is left beside them. Then every file
    written but the swap's second rename refused: the old folder is put back."""
    import os

    from BrainAnomalyLib.core import files
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.detection import writers
    from BrainAnomalySlicer import batch

    scan = sitk.ReadImage(str(worker_output / "scan.nrrd"))
    result = writers.read_result(worker_output / "out")
    case = tmp_path / "out" / "demo"
    batch.save_case(result, scan, case, "scan.nrrd")
    before = {p.name: p.read_bytes() for p in case.iterdir()}
    assert sorted(before) == sorted(writers.output_names("nrrd", result.reconstruction is not None))

    real, calls = writers.write_volume, []

    def third_write_fails(image, path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 3:
            Path(path).write_bytes(b"NRRD0004\n")  # a partial file, as a crash would leave it
            raise OSError(28, "No space left on device")
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(writers, "write_volume", third_write_fails)
    result.lesions = result.lesions[:1]  # a different result, so a mix of old and new files would show
    with pytest.raises(Exception, match="No space left"):
        batch.save_case(result, scan, case, "scan.nrrd")
    monkeypatch.undo()
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in case.iterdir()} == before
    assert [p.name for p in case.parent.iterdir()] == ["demo"]
    img = sitk.ReadImage(str(case / "anomaly_map.nrrd"))  # still a whole, readable volume
    assert img.GetSize() == scan.GetSize()

    real_replace, renames = os.replace, []

    def swap_fails(src, dst):
        renames.append(dst)
        if Path(dst).name == "demo" and len([r for r in renames if Path(r).name == "demo"]) == 1:
            raise PermissionError("in use")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", swap_fails)
    with pytest.raises(BadInputError, match="in use"):  # one line for the user, the swap undone
        batch.save_case(result, scan, case, "scan.nrrd")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in case.iterdir()} == before
    assert [p.name for p in case.parent.iterdir()] == ["demo"]

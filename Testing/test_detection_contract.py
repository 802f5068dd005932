"""One detection contract for every front end: the CLI, the inference worker and the Slicer batch write the same
files with the same lesion table; out-of-memory is handled inside the pipeline (only scoring is retried); errors
a user can cause end in one line and a documented exit code."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import oom_scorer  # noqa: F401  (registers the test-only scorer kinds)
from conftest import ROOT, new_scene

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.detection.postprocess import LESION_COLUMN_NAMES, PostprocessConfig
from BrainAnomalyLib.detection.request import DetectionRequest, add_options
from BrainAnomalyLib.detection.writers import output_names
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.store.models import load_model, save_model
from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.training.run import base_meta

WORKER_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "Testing")]), PYTHONUNBUFFERED="1")
# The worker with the test-only scorer kinds registered.
WORKER = [sys.executable, "-c", "import sys, oom_scorer; from BrainAnomalyLib.worker import main; "
                                "sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def case_file(tmp_path_factory, coarse_demo_case):
    folder = tmp_path_factory.mktemp("case")
    sitk.WriteImage(coarse_demo_case[0], str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


def _model(folder, kind, params=None):
    meta = base_meta(kind, folder.name, "T1", "test model", Grid(), PreprocessConfig(), PostprocessConfig(),
                     dict({"direction": "hypo"}, **(params or {})))
    meta["default_threshold"] = 2.0
    return load_model(save_model(folder, meta))


def _worker(*args, timeout=600):
    proc = subprocess.run([*WORKER, *map(str, args)], capture_output=True, text=True, cwd=str(ROOT),
                          env=WORKER_ENV, timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    return proc, events


def _starts_of(steps, name):
    """How many times a step began in a sequence of reported step names."""
    return sum(1 for i, s in enumerate(steps) if s == name and (i == 0 or steps[i - 1] != name))


def _same_outputs(a, b):
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (a / "lesions.csv").read_text(encoding="utf-8") == (b / "lesions.csv").read_text(encoding="utf-8")
    ra, rb = (json.loads((f / "result.json").read_text(encoding="utf-8")) for f in (a, b))
    for key in ("threshold", "lesions", "n_lesions", "pred_score", "scan_calibration", "display_range",
                "lesion_columns", "model", "min_lesion_ml", "device", "notes"):
        assert ra[key] == rb[key], key
    for name in ("anomaly_map.nrrd", "pred_mask.nrrd", "brain_mask.nrrd"):
        ia, ib = (sitk.ReadImage(str(f / name)) for f in (a, b))
        assert np.array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib)), name
        assert np.allclose(ia.GetDirection(), ib.GetDirection()) and np.allclose(ia.GetOrigin(), ib.GetOrigin())


def test_cli_worker_and_slicer_batch_write_the_same_outputs(tmp_path, case_file, template_normative_model):
    pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")
    from BrainAnomalySlicer.batch import run_batch
    from BrainAnomalySlicer.logic import DetectionOptions

    # Without N4 and registration: with registration the CLI's and the worker's maps differed in the last digits
    # (a lesion's mean score 5.5157 against 5.5155, ITK's multi-threaded optimisation is the likely cause); what
    # this test is about is what the front ends write, not the registration's reproducibility.
    model = str(template_normative_model.path)
    cli_out = tmp_path / "cli"
    assert main(["detect", str(case_file), "--model", model, "--device", "cpu", "--no-bias-correction",
                 "--no-register", "--format", "nrrd", "-o", str(cli_out), "-q"]) == 0
    proc, events = _worker("--input", case_file, "--output-dir", tmp_path / "worker", "--model", model,
                           "--device", "cpu", "--no-bias-correction", "--no-register")
    assert proc.returncode == 0 and events[-1]["event"] == "done", proc.stderr[-2000:]
    (tmp_path / "cases.csv").write_text(f"subject,modality,image,mask\ncase,T1,{case_file},\n")
    rows = run_batch(tmp_path / "cases.csv", tmp_path / "batch", DetectionOptions(
        model=model, device="cpu", bias_correction=False, registration=False), new_scene(), log=lambda line: None)
    assert [r["status"] for r in rows] == ["ok"], rows

    assert sorted(p.name for p in cli_out.iterdir()) == sorted(output_names("nrrd"))
    _same_outputs(cli_out, tmp_path / "worker")
    _same_outputs(cli_out, tmp_path / "batch" / "case")
    with open(cli_out / "lesions.csv", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    summary = json.loads((cli_out / "result.json").read_text(encoding="utf-8"))
    assert tuple(table[0]) == LESION_COLUMN_NAMES and len(table) == summary["n_lesions"] > 0
    assert float(table[0]["max_score"]) == summary["lesions"][0]["max_score"]
    assert int(rows[0]["n_lesions"]) == summary["n_lesions"]


def test_gpu_out_of_memory_retries_only_the_scoring(tmp_path, case_file, capsys):
    model = _model(tmp_path / "oom-probe", "oom-probe")
    out = tmp_path / "cli"
    assert main(["detect", str(case_file), "--model", str(model.path), "--device", "cpu", "--no-bias-correction",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    # The progress log has one line per step: preprocessing ran once, scoring ran until the batch fitted.
    steps = [line.split("] ", 1)[1] for line in captured.err.splitlines() if line.startswith("[")]
    assert _starts_of(steps, "register") == 1 and _starts_of(steps, "resample") == 1
    notes = json.loads((out / "result.json").read_text(encoding="utf-8"))["notes"]
    assert notes == ["out of memory on cpu at batch size 32, 16, 8; scored with batch size 4 on cpu instead "
                     "(preprocessing was kept)"]
    assert "note: out of memory" in captured.out

    proc, events = _worker("--input", case_file, "--output-dir", tmp_path / "worker", "--model", model.path,
                           "--device", "cpu", "--no-bias-correction")
    assert proc.returncode == 0 and events[-1]["event"] == "done", proc.stderr[-2000:]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert _starts_of(steps, "register") == 1 and _starts_of(steps, "resample") == 1
    assert [e["message"] for e in events if e["event"] == "log"][-1] == notes[0]
    assert json.loads((tmp_path / "worker" / "result.json").read_text(encoding="utf-8"))["notes"] == notes


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_out_of_memory_at_batch_one_falls_back_to_the_cpu(tmp_path, demo_case):
    from BrainAnomalyLib.detection.pipeline import Detector

    result = Detector(_model(tmp_path / "oom-gpu", "oom-gpu"), device="cuda").run(demo_case[0])
    assert result.device == "cpu"
    assert result.notes[0].startswith("out of memory on cuda at batch size 32, 16, 8, 4, 2, 1; scored with "
                                      "batch size 32 on cpu")


def test_host_out_of_memory_is_one_line_with_exit_4(tmp_path, case_file, capsys):
    model = _model(tmp_path / "oom-always", "oom-always")
    out = tmp_path / "cli"
    assert main(["detect", str(case_file), "--model", str(model.path), "--device", "cpu", "--no-bias-correction",
                 "-o", str(out), "-q"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory on the CPU even at batch size 1" in err[0]
    assert "CPU?" not in err[0] and "--device cpu" not in err[0]
    assert not out.exists()


def test_a_scorer_error_is_one_line_with_its_exit_code(tmp_path, case_file, capsys):
    # A model folder whose settings the scorer rejects (an edited model.json): the scorer raises ValueError.
    model = _model(tmp_path / "sideways", "intensity", {"direction": "sideways"})
    out = tmp_path / "cli"
    code = main(["detect", str(case_file), "--model", str(model.path), "--device", "cpu", "--no-bias-correction",
                 "--no-register", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith("brainanomaly: model sideways cannot score this scan: unknown direction 'sideways'")
    assert not out.exists()
    proc, events = _worker("--input", case_file, "--output-dir", tmp_path / "worker", "--model", model.path,
                           "--device", "cpu", "--no-bias-correction", "--no-register")
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert events[-1] == {"event": "error", "kind": "ModelError", "message": err[0][len("brainanomaly: "):],
                          "exit_code": 3}
    assert not (tmp_path / "worker").exists()


def test_request_from_arguments_json_and_a_parameter_node_is_the_same(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("-o", "--output")
    add_options(p)
    from_args = DetectionRequest.from_args(p.parse_args(
        ["scan.nii.gz", "-o", "out", "--model", "m", "--fpr", "0.005", "--calibration", "cohort", "--no-register",
         "--min-lesion-ml", "0.2", "--batch-size", "8", "--format", "nrrd"]))
    from_args.to_json(tmp_path / "request.json")
    # A Slicer parameter node gives every value as text, in one flat dict.
    node = {"input": "scan.nii.gz", "output": "out", "model": "m", "modality": "", "device": "auto",
            "skull_strip": "", "bias_correction": "true", "registration": "false", "value": "", "fpr": "0.005",
            "calibration": "cohort", "erode_voxels": "", "median_size": "", "min_lesion_ml": "0.2",
            "batch_size": "8", "output_format": "nrrd"}
    assert DetectionRequest.from_json(tmp_path / "request.json") == from_args == DetectionRequest.from_dict(node)
    assert from_args.threshold.fpr == 0.005 and from_args.preprocessing.registration is False
    assert from_args.postprocess_config({}).min_lesion_ml == 0.2
    assert from_args.preprocess_config({}).registration == "none"
    # The worker reads the same request from a JSON file, or from detect's options.
    from BrainAnomalyLib.worker import read_request

    assert read_request(["--request", str(tmp_path / "request.json")]) == from_args
    assert read_request(["--input", "scan.nii.gz", "--output-dir", "out", "--model", "m", "--fpr", "0.005",
                         "--calibration", "cohort", "--no-register", "--min-lesion-ml", "0.2", "--batch-size", "8"]
                        ) == from_args
    with pytest.raises(BadInputError, match="not both"):
        read_request(["--request", str(tmp_path / "request.json"), "--model", "x"])
    for bad, message in (({"value": 1.0, "fpr": 0.01}, "only one of"), ({"fpr": 2}, "outside"),
                         ({"false_findings": 20}, "between 0.05 and 10"),
                         ({"batch_size": "many"}, "not a valid int"), ({"colour": "red"}, "unknown request field"),
                         ({"output_format": "dicom"}, "unknown output format")):
        with pytest.raises(BadInputError, match=message):
            DetectionRequest.from_dict(bad)

"""The brainanomaly command as a user runs it: outputs, cohorts, exit codes, cancel."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.io import same_geometry
from BrainAnomalyLib.detection.writers import output_names


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory, demo_case):
    """The demo scan, whose preprocessing takes long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("demo")
    sitk.WriteImage(demo_case[0], str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


@pytest.fixture(scope="module")
def coarse_file(tmp_path_factory, coarse_demo_case):
    folder = tmp_path_factory.mktemp("coarse")
    sitk.WriteImage(coarse_demo_case[0], str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


def test_detect_writes_every_output_on_the_input_grid(tmp_path, coarse_file, template_normative_model, capsys):
    out = tmp_path / "out"
    code = main(["detect", str(coarse_file), "--model", str(template_normative_model.path), "-o", str(out), "-q"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(output_names("nifti"))  # no staging leftovers
    scan = sitk.ReadImage(str(coarse_file))
    for name in ("anomaly_map.nii.gz", "pred_mask.nii.gz", "brain_mask.nii.gz"):
        assert same_geometry(sitk.ReadImage(str(out / name)), scan, tol=1e-4)
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert summary["threshold"]["fpr"] == 0.01 and "calibration" in summary["threshold"]["source"]
    assert summary["n_lesions"] >= 1
    assert [s["step"] for s in summary["preprocessing"]] == ["orient", "skull-strip", "bias-correct", "register",
                                                             "resample", "sanity", "contrast", "normalise"]
    sanity = summary["preprocessing"][5]
    assert 0.8 < sanity["scaling_ratio"] <= 1.0 and sanity["notes"] == []  # the demo brain is the template's
    lines = (out / "lesions.csv").read_text(encoding="utf-8").strip().splitlines()
    assert lines[0].startswith("label,voxels,volume_ml,centroid_r") and len(lines) == summary["n_lesions"] + 1
    assert "1 lesion" in capsys.readouterr().out or summary["n_lesions"] > 1


def test_threshold_option_overrides_calibration(tmp_path, coarse_file, template_normative_model):
    out = tmp_path / "out"
    assert main(["detect", str(coarse_file), "--model", str(template_normative_model.path), "--threshold", "1e6",
                 "--no-bias-correction", "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert summary["threshold"] == {"value": 1e6, "fpr": None, "source": "user value"}
    assert summary["n_lesions"] == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pred_mask.nii.gz"))).sum() == 0
    assert summary["preprocessing"][2]["applied"] is False


def test_manifest_runs_a_cohort_and_reports_failures(tmp_path, coarse_file, intensity_model, capsys):
    const = sitk.GetImageFromArray(np.ones((64, 64, 64), np.float32))
    sitk.WriteImage(const, str(tmp_path / "const.nii.gz"))
    shutil.copy(coarse_file, tmp_path / "good.nii.gz")
    (tmp_path / "cohort.csv").write_text("subject,modality,image,mask\n"
                                         "s1,T1,good.nii.gz,\ns2,T1,const.nii.gz,\n")
    out = tmp_path / "out"
    # In this process: a pool of worker processes spends seconds importing in each; a failure reported from a pool's
    # worker is test_dicom's manifest test (its NIfTI row), the pool's bytes test_cohort's.
    code = main(["detect", "--manifest", str(tmp_path / "cohort.csv"), "--model", str(intensity_model.path),
                 "--no-bias-correction", "--workers", "1", "-o", str(out), "-q"])
    assert code == 2  # one case failed
    assert (out / "s1_T1" / "anomaly_map.nii.gz").is_file()
    assert not (out / "s2_T1").exists()
    summary = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert summary[1].startswith("s1,T1,ok,") and summary[2].startswith("s2,T1,failed,")
    captured = capsys.readouterr()
    assert "1 of 2 T1 scans done" in captured.out and "s2_T1" in captured.err and "constant" in captured.err


def test_unknown_model_exits_3(tmp_path, demo_file, capsys):
    assert main(["detect", str(demo_file), "--model", "no-such-model", "-o", str(tmp_path), "-q"]) == 3
    assert "no model named 'no-such-model'" in capsys.readouterr().err


def test_tampered_model_exits_3(tmp_path, demo_file, template_normative_model, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(template_normative_model.path, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert main(["detect", str(demo_file), "--model", str(bad), "-o", str(tmp_path / "o"), "-q"]) == 3
    assert "does not match its checksum" in capsys.readouterr().err


def test_models_lists_shipped_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "default model" in out


def test_ctrl_c_cancels_with_exit_130_and_no_outputs(tmp_path, demo_file, template_normative_model):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "BrainAnomalyLib.cli.main", "detect", str(demo_file), "--model",
                             str(template_normative_model.path), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # Interrupted once the progress log says N4 has begun: well inside preprocessing (N4 and registration take
    # seconds more), whatever the machine's load, without a fixed wait.
    seen = []
    while not seen or not seen[-1].rstrip().endswith("] bias-correct"):
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
    assert proc.poll() is None, "detection finished before it could be cancelled: " + "".join(seen)[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "cancelled" in err
    assert not out.exists() or not any(out.iterdir())


def _entry(args, prelude=""):
    """The console command's entry point run in a new process with stdout and stderr piped (so block-buffered)."""
    code = (f"import sys\n{prelude}\nsys.argv = ['brainanomaly'] + {list(args)!r}\n"
            "from BrainAnomalyLib.cli.main import entry\nentry()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_entry_ends_the_process_with_its_output_exit_handlers_and_code(tmp_path):
    # entry() skips Python's module teardown: what a normal exit still does must happen first.
    done = _entry(["models"], "import atexit; atexit.register(lambda: print('exit handlers ran'))")
    assert done.returncode == 0, done.stderr
    assert "default model" in done.stdout  # buffered output flushed, not lost
    assert done.stdout.rstrip().endswith("exit handlers ran")
    bad = _entry(["detect", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out")])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"brainanomaly: input not found: {tmp_path / 'missing.nii.gz'}"]


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    code = "import sys\nsys.argv = ['brainanomaly', 'models']\nfrom BrainAnomalyLib.cli.main import entry\nentry()\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `brainanomaly models | head -0` would
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""

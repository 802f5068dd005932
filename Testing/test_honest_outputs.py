"""Honest outputs (issue 15 item 5): an earlier result is replaced only when asked, and then whole; an unwritable
output folder is refused before any computing; manifest runs name the rows they skip; calibration on fewer than
the minimum of healthy scans is refused unless allowed, and then recorded; error texts carry no Python reprs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.manifest import Case, write_manifest
from BrainAnomalyLib.detection.writers import output_names, write_result

from conftest import write_template_cases

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory, coarse_demo_case):
    path = tmp_path_factory.mktemp("scan") / "case.nii.gz"
    sitk.WriteImage(coarse_demo_case[0], str(path))
    return path


def _err_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- an earlier result ------------------------------------------------------------------------------------------


def test_earlier_result_is_refused_then_replaced_whole_with_overwrite(tmp_path, scan_file, intensity_model,
                                                                      coarse_demo_case, coarse_demo_result, capsys):
    out = tmp_path / "out"
    base = ["detect", str(scan_file), "--model", str(intensity_model.path), "--no-bias-correction", "-q"]
    # An earlier result of another model, one with a reconstruction, in the other format, plus a reconstruction in
    # this format: none of it may outlive a new run.
    write_result(coarse_demo_result, coarse_demo_case[0], out, "nrrd", "case.nii.gz")
    shutil.copy(out / "anomaly_map.nrrd", out / "reconstruction.nii.gz")
    before = _snapshot(out)
    capsys.readouterr()

    assert main([*base, "-o", str(out)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "holds an earlier result" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == before

    assert main([*base, "--overwrite", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(output_names("nifti", reconstruction=False))
    assert not list(tmp_path.glob(".out-swap-*"))  # the swap's work folder is gone too


def test_other_files_are_never_deleted_even_with_overwrite(tmp_path, scan_file, intensity_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text("{}")
    (out / "my notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["detect", str(scan_file), "--model", str(intensity_model.path), "-o", str(out), "-q",
                     *extra]) == 2
        err = _err_lines(capsys)
        assert len(err) == 1 and "my notes.txt" in err[0] and "new or empty folder" in err[0], err
    assert (out / "my notes.txt").read_text() == "mine"


def test_writer_refuses_an_earlier_result_without_overwrite(tmp_path, coarse_demo_case, coarse_demo_result):
    """The one writer applies the rule itself, for any front end that skipped the early check."""
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.detection.writers import write_result

    scan, result = coarse_demo_case[0], coarse_demo_result
    out = write_result(result, scan, tmp_path / "out", "nrrd")
    with pytest.raises(BadInputError, match="earlier result"):
        write_result(result, scan, out, "nifti")
    write_result(result, scan, out, "nifti", overwrite=True)
    names = output_names("nifti", result.reconstruction is not None)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_what_counts_as_an_earlier_result(tmp_path, monkeypatch):
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.detection.writers import check_output, folder_contents

    assert check_output(tmp_path / "new" / "deeper") is False and not (tmp_path / "new").exists()
    run = tmp_path / "run"
    (run / "s1_T1" / ".partial-x").mkdir(parents=True)  # a killed run's staging folder is ours
    (run / "s1_T1" / "result.json").write_text("{}")
    (run / "summary.csv").write_text("")
    assert folder_contents(run, cases=True) == (["s1_T1/", "summary.csv"], [])
    assert check_output(run, overwrite=True, cases=True) is True
    with pytest.raises(BadInputError, match="not a BrainAnomaly result"):
        check_output(run)  # a single scan's folder holds no case folders
    (run / "s1_T1" / "scan.nii.gz").write_text("")  # the user's file inside a case folder
    with pytest.raises(BadInputError, match="s1_T1/"):
        check_output(run, overwrite=True, cases=True)
    (tmp_path / "afile").write_text("")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_output(tmp_path / "afile")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "result.json").write_text("{}")
    monkeypatch.chdir(mine)  # the current folder cannot be swapped away
    with pytest.raises(BadInputError, match="current folder"):
        check_output(".", overwrite=True)


# --- an unwritable output folder --------------------------------------------------------------------------------


def _unwritable(tmp_path: Path, how: str) -> Path:
    if how == "under a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "out"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


@pytest.mark.parametrize("how", ["under a file", "read-only parent"])
def test_unwritable_output_is_refused_before_any_computing(tmp_path, scan_file, intensity_model, monkeypatch,
                                                           capsys, how):
    from BrainAnomalyLib.detection import pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("computing started before the output folder was checked")

    monkeypatch.setattr(pipeline.Detector, "from_request", must_not_run)
    monkeypatch.setattr(pipeline.Detector, "run_request", must_not_run)
    out = _unwritable(tmp_path, how)
    code = main(["detect", str(scan_file), "--model", str(intensity_model.path), "-o", str(out), "-q"])
    assert code == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"brainanomaly: cannot write to {out}"), err


def test_worker_refuses_an_unwritable_output_before_loading_the_model(tmp_path, scan_file, intensity_model):
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "BrainAnomalyLib.worker", "--input", str(scan_file),
                           "--output-dir", str(tmp_path / "file" / "out"), "--model", str(intensity_model.path),
                           "--device", "cpu"], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2
    assert [e["event"] for e in events] == ["error"]  # not even the "load model" progress step
    assert events[0]["kind"] == "BadInputError" and "cannot write to" in events[0]["message"]
    assert "\n" not in events[0]["message"]


# --- manifest runs ----------------------------------------------------------------------------------------------


def test_manifest_names_skipped_rows_and_overwrite_drops_stale_cases(tmp_path, scan_file, intensity_model,
                                                                     capsys):
    shutil.copy(scan_file, tmp_path / "good.nii.gz")
    (tmp_path / "first.csv").write_text("subject,modality,image,mask\n"
                                        "old,T1,good.nii.gz,\nf1,FLAIR,good.nii.gz,\n"
                                        "m1,T1,missing1.nii.gz,\nm2,T1,missing2.nii.gz,\n")
    out = tmp_path / "out"
    # In this process: what is tested is the cohort's folder, not the engine (a pool's failures: test_dicom), and a
    # pool of worker processes spends seconds importing in each.
    base = ["--model", str(intensity_model.path), "--no-bias-correction", "--workers", "1", "-o", str(out), "-q"]
    assert main(["detect", "--manifest", str(tmp_path / "first.csv"), *base]) == 2  # the missing scans fail
    captured = capsys.readouterr()
    assert "skipped 1 of 4 rows: modality FLAIR, this model is for T1" in captured.out
    assert "1 of 3 T1 scans done" in captured.out
    summary = (out / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert summary[1].startswith("f1,FLAIR,skipped,") and "this model is for T1" in summary[1]
    assert sorted(p.name for p in out.iterdir()) == ["old_T1", "summary.csv"]

    (tmp_path / "second.csv").write_text("subject,modality,image,mask\nnew,T1,missing1.nii.gz,\n")
    before = _snapshot(out)
    assert main(["detect", "--manifest", str(tmp_path / "second.csv"), *base]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "earlier result" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == before

    assert main(["detect", "--manifest", str(tmp_path / "second.csv"), *base, "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # the earlier run's old_T1 is gone
    assert (out / "summary.csv").read_text(encoding="utf-8").splitlines()[1].startswith("new,T1,failed,")


# --- calibration on few scans -----------------------------------------------------------------------------------


def _healthy(folder: Path, n: int) -> list:
    return write_template_cases(folder, n, seed=9)


NO_PRE = ["--skull-strip", "none", "--no-bias-correction", "--no-register"]


def test_calibrate_on_one_scan_is_refused_unless_allowed(tmp_path, template_normative_model, capsys):
    write_manifest(tmp_path / "one.csv", _healthy(tmp_path, 1))
    model = tmp_path / "model"
    shutil.copytree(template_normative_model.path, model)
    base = ["calibrate", "--model", str(model), "--manifest", str(tmp_path / "one.csv"), "-q",
            "--cache-dir", str(tmp_path / "cache")]
    before = (model / "model.json").read_bytes()
    assert main(base) == 2
    assert not (tmp_path / "cache").exists()  # refused before any scan is preprocessed
    err = _err_lines(capsys)
    assert len(err) == 1 and "at least 5" in err[0] and "--allow-few-scans" in err[0], err
    assert (model / "model.json").read_bytes() == before

    assert main([*base, "--allow-few-scans"]) == 0
    assert "fewer than the minimum of 5" in capsys.readouterr().out
    calib = json.loads((model / "model.json").read_text(encoding="utf-8"))["calibration"]
    assert calib["n_scans"] == 1 and calib["few_scans"]["n_scans"] == 1 and calib["few_scans"]["minimum"] == 5
    assert "--allow-few-scans" in calib["few_scans"]["note"]


def test_train_refuses_a_calibration_split_below_the_minimum_before_training(tmp_path, capsys):
    cases = _healthy(tmp_path, 4)  # 3 train, 1 calibration
    cases.append(Case("f0", "FLAIR", cases[0].image, None))
    write_manifest(tmp_path / "cohort.csv", cases)
    out = tmp_path / "model"
    base = ["train", "--model", "normative", "--manifest", str(tmp_path / "cohort.csv"), "--modality", "T1",
            "-o", str(out), "--cache-dir", str(tmp_path / "cache"), "-q", *NO_PRE]
    assert main(base) == 2
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before any scan is preprocessed
    err = _err_lines(capsys)
    assert len(err) == 1 and "calibration split" in err[0] and "at least 5" in err[0], err

    assert main([*base, "--allow-few-scans"]) == 0
    stdout = capsys.readouterr().out
    assert "fewer than the minimum of 5" in stdout and "skipped 1 manifest row(s) of other modalities" in stdout
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["calibration"]["few_scans"]["n_scans"] == 1
    assert meta["training_data"]["other_modality_rows"] == 1


# --- plain error texts ------------------------------------------------------------------------------------------


def test_error_texts_carry_no_numpy_reprs(tmp_path, capsys):
    """Representative failures, formatted as the CLI prints them: no np.int64(...), no ITK jargon."""
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.core.io import read_volume

    flat = tmp_path / "slice.nii.gz"
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    sitk.WriteImage(img, str(flat))
    vols = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((8, 8, 8), np.float32))] * 3)
    sitk.WriteImage(vols, str(tmp_path / "four.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image" * 20)
    texts = []
    for path in (flat, tmp_path / "four.nii.gz", tmp_path / "broken.nii.gz"):
        with pytest.raises(BadInputError) as exc:
            read_volume(path)
        texts.append(str(exc.value))
    (tmp_path / "bad.csv").write_text("subject,image\na,x.nii.gz\n")
    assert main(["detect", "--manifest", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "o"), "-q"]) == 2
    texts.append(capsys.readouterr().err)
    for text in texts:
        assert "np." not in text and "itk::" not in text.lower() and "ExceptionObject" not in text, text
        assert len(text.strip().splitlines()) == 1, text
    assert "only 1 slice" in texts[0] and "not an image format" in texts[2], texts


def test_demo_replaces_only_its_own_earlier_output(tmp_path):
    """Run twice into one folder the demo replaces its earlier output (checked here without the minute-long run;
    the README's demo test runs it), but never another result or the user's files."""
    from BrainAnomalyLib.cli.demo import DEMO_FILES, check_demo_output
    from BrainAnomalyLib.core.errors import BadInputError

    out = tmp_path / "demo_output"
    check_demo_output(out)
    out.mkdir()
    for name in (*DEMO_FILES, *output_names("nifti")):
        (out / name).write_text("")
    check_demo_output(out)
    (out / DEMO_FILES[0]).unlink()  # now a detect result, not a demo's
    with pytest.raises(BadInputError, match="not a demo's"):
        check_demo_output(out)
    (out / DEMO_FILES[0]).write_text("")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="notes.txt"):
        check_demo_output(out)

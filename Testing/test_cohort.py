"""`detect --manifest` on every engine: one process, a process pool, a 2-worker Dask local cluster. Tiny scans (the
demo case at 4 mm, the model grid's spacing: preprocessed, N4 included, in half the CPU time of the 3 mm case) and an
intensity model on a 4 mm grid keep each run to seconds."""

import json
import shutil

import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli import cohort_engines
from BrainAnomalyLib.cli.cohort import CaseJob
from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.detection.request import DetectionRequest
from BrainAnomalyLib.detection.writers import VOLUMES

SUBJECTS = ("s0", "s1")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from BrainAnomalyLib.core.template import Grid
    from BrainAnomalyLib.detection.postprocess import PostprocessConfig
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.store.models import save_model
    from BrainAnomalyLib.synth.demo import make_demo_case
    from BrainAnomalyLib.training.run import base_meta

    folder = tmp_path_factory.mktemp("cohort")
    rows, labelled = ["subject,modality,image,mask"], ["subject,modality,image,mask"]
    for i, subject in enumerate(SUBJECTS):
        scan, truth = make_demo_case(spacing=(4.0, 4.0, 4.0), seed=i, contrast=0.5 + 0.1 * i)
        sitk.WriteImage(scan, str(folder / f"{subject}.nii.gz"))
        sitk.WriteImage(truth, str(folder / f"{subject}_mask.nii.gz"))
        rows.append(f"{subject},T1,{subject}.nii.gz,")
        labelled.append(f"{subject},T1,{subject}.nii.gz,{subject}_mask.nii.gz" if i else rows[-1])
    (folder / "cohort.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "labelled.csv").write_text("\n".join(labelled) + "\n", encoding="utf-8")
    # N4 left on: with registration, the steps whose sums depended on the thread count (preprocess/itkrun.py)
    meta = base_meta("intensity", "small-intensity", "T1", "test model", Grid(size=(48, 56, 40),
                     spacing=(4.0, 4.0, 4.0)), PreprocessConfig(), PostprocessConfig(), {"direction": "hypo"})
    meta["default_threshold"] = 2.0
    model = save_model(folder / "model", meta)
    # For evaluate, whose worker processes are compared with one process on the numbers: N4 off there, as the
    # engines' byte identity above covers the preprocessing (N4 included) on worker processes.
    meta["preprocessing"] = dict(meta["preprocessing"], bias_correction=False)
    save_model(folder / "model-no-n4", meta)
    return folder / "cohort.csv", model


def _detect(cohort, out, *options):
    manifest, model = cohort
    return main(["detect", "--manifest", str(manifest), "--model", str(model), "-o", str(out), "-q", *options])


@pytest.fixture(scope="module")
def one_process(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "one"
    assert _detect(cohort, out, "--workers", "1") == 0
    return out


def _volume_bytes(out):
    return {(s, v): (out / f"{s}_T1" / f"{v}.nii.gz").read_bytes() for s in SUBJECTS for v in VOLUMES
            if (out / f"{s}_T1" / f"{v}.nii.gz").is_file()}


@pytest.mark.parametrize("engine", [["--workers", "2"], ["--dask", "--workers", "2"]], ids=["pool", "dask"])
def test_engines_write_the_same_bytes_as_one_process(cohort, one_process, tmp_path, engine, capsys):
    capsys.readouterr()
    assert _detect(cohort, tmp_path / "out", *engine) == 0
    said = capsys.readouterr().out
    assert "2 of 2 T1 scans done" in said and "throughput: 2 cases in" in said
    expected = _volume_bytes(one_process)
    assert len(expected) == 2 * 3  # anomaly map, predicted mask and brain mask of each case
    assert _volume_bytes(tmp_path / "out") == expected
    assert (tmp_path / "out" / "summary.csv").read_text() == (one_process / "summary.csv").read_text()


def test_resume_keeps_complete_cases_and_runs_the_rest(cohort, one_process, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_process, out)
    shutil.rmtree(out / "s1_T1")
    kept = (out / "s0_T1" / "anomaly_map.nii.gz").stat().st_mtime_ns
    assert _detect(cohort, out, "--workers", "1") == 2  # an earlier run is there: refused without --resume
    capsys.readouterr()
    assert _detect(cohort, out, "--workers", "1", "--resume") == 0
    assert "2 of 2 T1 scans done (1 kept from an earlier run)" in capsys.readouterr().out
    assert (out / "s0_T1" / "anomaly_map.nii.gz").stat().st_mtime_ns == kept
    assert _volume_bytes(out) == _volume_bytes(one_process)
    rows = [line.split(",") for line in (out / "summary.csv").read_text().splitlines()[1:]]
    before = [line.split(",") for line in (one_process / "summary.csv").read_text().splitlines()[1:]]
    assert [r[:6] for r in rows] == [r[:6] for r in before]
    assert [r[6] for r in rows] == ["complete result of an earlier run", ""]


def _jobs(n):
    return [CaseJob(f"c{i}", f"c{i}", "T1", DetectionRequest(input="x", output=f"/nonexistent/c{i}")) for i in range(n)]


def test_a_case_that_raises_is_run_once_more_then_reported(monkeypatch):
    calls = {}

    def flaky(job, reporter=None):
        calls[job.key] = calls.get(job.key, 0) + 1
        if job.key == "c0" and calls[job.key] == 1:
            raise RuntimeError("worker lost")  # once: the retry succeeds
        if job.key == "c1":
            raise MemoryError("still too big")  # every time: reported after the retry
        return {"key": job.key, "row": [job.key], "status": "ok", "exit_code": 0, "seconds": 0.0}

    monkeypatch.setattr(cohort_engines, "detect_case", flaky)
    rows = {}
    cohort_engines.run_sequential(_jobs(3), lambda job, row: rows.__setitem__(job.key, row), Reporter())
    assert calls == {"c0": 2, "c1": 2, "c2": 1}
    assert rows["c0"]["status"] == "ok" and rows["c2"]["status"] == "ok"
    assert rows["c1"]["status"] == "failed" and rows["c1"]["exit_code"] == 1
    assert "MemoryError: still too big" in rows["c1"]["row"][-1]


def test_evaluate_on_worker_processes_gives_the_numbers_of_one_process(cohort, tmp_path):
    manifest, model = cohort
    model = model.parent / "model-no-n4"
    metrics = []
    for workers in ("1", "2"):
        out = tmp_path / workers
        assert main(["evaluate", "--manifest", str(manifest.parent / "labelled.csv"), "--model", str(model),
                     "--no-cache", "--workers", workers, "-o", str(out), "-q"]) == 0
        m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["small-intensity"]
        metrics.append({k: v for k, v in m.items() if k not in ("seconds_per_volume", "scoring_peak_mb")})
    assert metrics[0]["n_lesion_scans"] == 1 and metrics[0]["n_healthy_scans"] == 1 and metrics[0]["froc"]
    assert metrics[1] == metrics[0]

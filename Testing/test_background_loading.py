"""The networks load on a thread while the scan is preprocessed (core/background.py, Detector.start_loading, from the
registration on): an error there ends the detection as it did before the overlap (one line, its exit code, no
output folder); a bad scan or a cancel does not wait for the loading."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT
from test_detection_contract import _model, _worker

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.background import Background, settle
from BrainAnomalyLib.core.errors import BadInputError, Cancelled
from BrainAnomalyLib.core.progress import CancelToken, Reporter
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.scorers.base import register
from BrainAnomalyLib.scorers.intensity import IntensityScorer
from BrainAnomalyLib.store.models import load_model, save_model

SHIPPED = ROOT / "Resources" / "Models"
RELEASE = threading.Event()  # never set by the tests that need the loading to hang


@pytest.fixture(autouse=True)
def _no_load_outlives_its_test():
    """A loading left hanging would make every later `settle()` in this process (deepbet's, in another test file
    run by the same worker) wait for ever: each test's hung loads are released, and awaited, when it ends."""
    RELEASE.clear()
    yield
    RELEASE.set()
    settle()


@register
class HangingLoad(IntensityScorer):
    """The intensity scorer whose networks never finish loading (until RELEASE is set)."""

    kind = "hanging-load"

    def prepare(self) -> None:
        RELEASE.wait()


STEPS: list = []  # the steps reported so far by the detection under test
LOADING_SAW: list = []  # how many of them had been reported when the loading began


@register
class RecordingLoad(IntensityScorer):
    """The intensity scorer noting when its loading begins."""

    kind = "recording-load"

    def prepare(self) -> None:
        LOADING_SAW.append(len(STEPS))


def test_the_networks_load_after_the_skull_strip_and_n4(tmp_path, coarse_demo_case):
    model = _model(tmp_path / "recording", "recording-load")
    det = Detector(model, device="cpu", preprocess_config=PreprocessConfig(registration="none"))
    STEPS.clear()
    LOADING_SAW.clear()
    det.run(coarse_demo_case[0], modality="T1", reporter=Reporter(lambda step, fraction: STEPS.append(step)))
    began = LOADING_SAW[0]
    assert "bias-correct" in STEPS[:began] and "bias-correct" not in STEPS[began:], STEPS
    assert "resample" in STEPS[began - 1:began + 1]  # the first step after N4 here (no registration) started it


def test_background_hands_back_its_value_or_its_error():
    assert Background(lambda: 42).result() == 42
    work = Background(lambda: {}["missing"])
    with pytest.raises(KeyError, match="missing"):
        work.result()
    assert work.seconds is not None and work.done()


def test_a_cancel_ends_the_wait_and_settle_waits_for_running_work():
    gate = threading.Event()
    work = Background(gate.wait)
    token = CancelToken()
    threading.Timer(0.3, token.cancel).start()
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        work.result(Reporter(cancel=token))
    assert time.perf_counter() - started < 5 and not work.done()
    threading.Timer(0.2, gate.set).start()
    settle()
    assert work.done()


def test_a_bad_scan_is_refused_without_waiting_for_the_networks(tmp_path):
    model = _model(tmp_path / "hanging", "hanging-load")
    det = Detector(model, device="cpu", preprocess_config=PreprocessConfig(skull_strip="auto", registration="none",
                                                                           bias_correction=False))
    arr = np.zeros((100, 100, 100), np.float32)
    arr[40:45, 40:45, 40:45] = 100.0  # "stripped", but no brain: refused while preprocessing
    with pytest.raises(BadInputError, match="brain mask .* empty or too small"):
        det.run(sitk.GetImageFromArray(arr), modality="T1")  # waiting for the hanging load would never return
    det.start_loading()
    with pytest.raises(BadInputError, match="brain mask .* empty or too small"):
        det.run(sitk.GetImageFromArray(arr), modality="T1")
    assert not det._loading.done()  # refused while the loading still hung


def test_cancel_while_waiting_for_the_networks(tmp_path, coarse_demo_case):
    model = _model(tmp_path / "hanging", "hanging-load")
    det = Detector(model, device="cpu", preprocess_config=PreprocessConfig(registration="none",
                                                                           bias_correction=False))
    token = CancelToken()

    def progress(step, fraction):
        if step == "normalise":
            token.cancel()  # the preprocessing is over: the next check is the wait for the networks

    raised = []

    def detect():
        try:
            det.run(coarse_demo_case[0], modality="T1", reporter=Reporter(progress, token))
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=detect, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the wait for the networks did not see the cancel"
    assert len(raised) == 1 and isinstance(raised[0], Cancelled), raised
    assert not det._loading.done()


def _broken_weights(folder):
    """A copy of the shipped CAE whose weights lack a layer (its files and checksums consistent): the error comes
    from building the network, on the loading thread."""
    cae = load_model(SHIPPED / "cae-t1-ixi")
    tensors = dict(cae.tensors)
    del tensors[next(k for k in sorted(tensors) if k.startswith("net.") and k.endswith(".weight"))]
    meta = {k: v for k, v in cae.meta.items() if k not in ("files", "storage_dtype")}
    return save_model(folder, meta, tensors)


def test_an_error_while_loading_the_networks_is_one_line_with_exit_3(tmp_path, case_file, capsys):
    model = _broken_weights(tmp_path / "broken-cae")
    out = tmp_path / "cli"
    options = ["--device", "cpu", "--no-bias-correction", "--no-register"]
    code = main(["detect", str(case_file), "--model", str(model), *options, "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert err[0].startswith("brainanomaly: model weights do not fit the cae network (missing ['"), err[0]
    assert not out.exists()
    proc, events = _worker("--input", case_file, "--output-dir", tmp_path / "worker", "--model", model, *options)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert events[-1] == {"event": "error", "kind": "ModelError", "message": err[0][len("brainanomaly: "):],
                          "exit_code": 3}
    assert not (tmp_path / "worker").exists()


def test_a_model_whose_checksum_fails_is_refused_before_anything_runs(tmp_path, case_file, capsys):
    folder = shutil.copytree(SHIPPED / "cae-t1-ixi", tmp_path / "tampered-cae")
    tensors = folder / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    out = tmp_path / "cli"
    code = main(["detect", str(case_file), "--model", str(folder), "--device", "cpu", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err == ["brainanomaly: model tampered-cae: model.safetensors does not match its checksum "
                                 "(broken or tampered)"]
    assert not out.exists()
    proc, events = _worker("--input", case_file, "--output-dir", tmp_path / "worker", "--model", folder,
                           "--device", "cpu")
    assert proc.returncode == 3 and events[-1]["message"] == err[0][len("brainanomaly: "):]
    assert not (tmp_path / "worker").exists()


@pytest.fixture(scope="module")
def case_file(tmp_path_factory, coarse_demo_case):
    folder = tmp_path_factory.mktemp("case")
    sitk.WriteImage(coarse_demo_case[0], str(folder / "case.nii.gz"))
    return folder / "case.nii.gz"


def test_template_warmed_on_a_thread_is_built_once(monkeypatch):
    """Detector starts core.template.warm_grid on a thread; a preprocessing that reaches the template meanwhile
    waits for that build and gets the very same arrays, not a second copy made beside it."""
    from BrainAnomalyLib.core import template

    grid = template.Grid()
    for build in (template.template_1mm, template.template_on_grid, template.brain_mask_on_grid,
                  template.tissue_on_grid, template.ventricles_on_grid):
        build.cache_clear()
    resampled, resample = [], template._on_grid

    def slow_resample(image, grid, interpolator=None):  # the caller below surely arrives during the build
        resampled.append(image)
        time.sleep(0.3)
        return resample(image, grid, interpolator)

    monkeypatch.setattr(template, "_on_grid", slow_resample)
    warming = threading.Thread(target=template.warm_grid, args=(grid,))
    warming.start()
    fixed, mask = template.template_on_grid(grid), template.brain_mask_on_grid(grid)
    warming.join()
    assert len(resampled) == 3  # T1, WM and GM, each once
    assert template.template_on_grid(grid) is fixed and template.brain_mask_on_grid(grid) is mask
    assert mask.any() and template.ventricles_on_grid(grid).any()


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2])
def test_a_process_ending_during_the_template_warm_up_ends_cleanly(delay):
    """A script that makes a Detector and ends at once, while the warm-up thread runs SimpleITK: the interpreter
    waits for that thread instead of aborting (exit code 134, "FATAL: exception not rethrown", as it did with the
    thread a daemon)."""
    code = ("from BrainAnomalyLib.store.models import resolve_model\n"
            "from BrainAnomalyLib.detection.pipeline import Detector\n"
            f"Detector(resolve_model('intensity-flair'), device='cpu')\nimport time\ntime.sleep({delay})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "FATAL" not in run.stderr, run.stderr[-500:]

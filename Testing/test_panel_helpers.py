"""The Slicer panel's GUI-free helpers (BrainAnomalySlicer.panel): slider <-> healthy FPR, the texts the panel
shows, and the options a click on "Detect anomalies" hands the logic."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "BrainAnomaly") not in sys.path:
    sys.path.insert(0, str(ROOT / "BrainAnomaly"))  # where Slicer puts the scripted module's folder

from BrainAnomalySlicer import panel  # noqa: E402


def test_slider_spans_a_tenth_of_a_percent_to_ten_percent():
    assert panel.slider_to_fpr(panel.SLIDER_MIN) == pytest.approx(0.001)
    assert panel.slider_to_fpr(0.0) == pytest.approx(0.01)
    assert panel.slider_to_fpr(panel.SLIDER_MAX) == pytest.approx(0.1)
    assert panel.slider_to_fpr(5.0) == pytest.approx(0.1)  # clamped
    assert panel.slider_to_fpr(-5.0) == pytest.approx(0.001)


@pytest.mark.parametrize("fpr", [0.001, 0.002, 0.01, 0.05, 0.1])
def test_slider_round_trip(fpr):
    assert panel.slider_to_fpr(panel.fpr_to_slider(fpr)) == pytest.approx(fpr)


def test_slider_position_of_odd_rates():
    assert panel.fpr_to_slider(None) == pytest.approx(0.0)  # default 1 %
    assert panel.fpr_to_slider(0.0) == pytest.approx(0.0)
    assert panel.fpr_to_slider(float("nan")) == pytest.approx(0.0)
    assert panel.fpr_to_slider(0.5) == panel.SLIDER_MAX
    assert panel.fpr_to_slider(1e-6) == panel.SLIDER_MIN


def test_slider_is_monotonic():
    values = [panel.slider_to_fpr(v / 10) for v in range(-10, 11)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_threshold_text():
    assert panel.threshold_text(0.01, 2.3456) == "1.00 % healthy FPR · score ≥ 2.35"
    assert panel.threshold_text(0.001, None) == "0.10 % healthy FPR"
    assert panel.threshold_text(0.1, 0.5) == "10.0 % healthy FPR · score ≥ 0.50"
    text = panel.threshold_text(None, 1.5, calibrated=False)
    assert "1.50" in text and "no calibration" in text
    assert "no calibration" in panel.threshold_text(None, None, calibrated=False)


def test_findings_slider_spans_the_librarys_range_on_a_log_scale():
    from BrainAnomalyLib.calibration.findings import FALSE_FINDINGS_RANGE

    lo, hi = FALSE_FINDINGS_RANGE
    assert panel.slider_to_false_findings(panel.FINDINGS_SLIDER_MIN) == pytest.approx(lo)
    assert panel.slider_to_false_findings(panel.FINDINGS_SLIDER_MAX) == pytest.approx(hi)
    assert panel.slider_to_false_findings(-9.0) == pytest.approx(lo) and panel.slider_to_false_findings(9.0) == hi
    assert panel.slider_to_false_findings(panel.false_findings_to_slider(None)) == 0.5  # the default
    middle = (panel.FINDINGS_SLIDER_MIN + panel.FINDINGS_SLIDER_MAX) / 2  # log scale: the geometric mean
    assert panel.slider_to_false_findings(middle) == pytest.approx((lo * hi) ** 0.5, rel=0.02)
    values = [panel.slider_to_false_findings(panel.FINDINGS_SLIDER_MIN + k * 0.05) for k in range(47)]
    assert values == sorted(values) and len(set(values)) > 30
    for target in (0.05, 0.1, 0.5, 2.0, 10.0):
        assert panel.slider_to_false_findings(panel.false_findings_to_slider(target)) == pytest.approx(target)
    assert panel.false_findings_to_slider(100.0) == panel.FINDINGS_SLIDER_MAX
    assert panel.false_findings_to_slider(float("nan")) == panel.false_findings_to_slider(0.5)


def test_threshold_unit_follows_the_results_calibration_and_the_checkbox():
    calibrated = {"curve": {"fpr": [0.01]}, "findings": {"per_scan_scores": [[2.0], [1.0], []]}}
    assert panel.threshold_unit(calibrated, voxel_threshold=False) == panel.FINDINGS
    assert panel.threshold_unit(calibrated, voxel_threshold=True) == panel.VOXEL
    # Models calibrated before findings were, uncalibrated models: the voxel FPR slider.
    assert panel.threshold_unit(dict(calibrated, findings=None), False) == panel.VOXEL
    assert panel.threshold_unit(dict(calibrated, curve=None), False) == panel.VOXEL
    assert panel.threshold_unit({"curve": None}, False) == panel.VOXEL
    # No outputs yet: what the next run asks for.
    assert panel.threshold_unit(None, False) == panel.FINDINGS and panel.threshold_unit(None, True) == panel.VOXEL


def test_findings_text():
    assert panel.findings_text(0.5, 3) == "0.5 false findings per healthy scan · 3 findings"
    assert panel.findings_text(1.0, 1) == "1 false finding per healthy scan · 1 finding"
    assert panel.findings_text(0.05, 0) == "0.05 false findings per healthy scan · 0 findings"
    assert panel.findings_text(2.0, None, 12.345) == "2 false findings per healthy scan · finding score ≥ 12.3"
    assert panel.findings_text(None) == "0.5 false findings per healthy scan"


def test_model_has_finding_calibration(tmp_path):
    from BrainAnomalyLib.store.models import list_models

    def entry(calibration):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "model.json").write_text(json.dumps({"calibration": calibration}), encoding="utf-8")
        return {"id": folder.name, "location": str(folder)}

    assert panel.model_has_finding_calibration(entry({"findings": {"per_scan_scores": [[1.0], []]}}))
    assert not panel.model_has_finding_calibration(entry({"thresholds": {"0.01": 2.0}}))
    assert not panel.model_has_finding_calibration(entry(None))
    assert not panel.model_has_finding_calibration({"id": "gone", "location": str(tmp_path / "gone")})
    assert not panel.model_has_finding_calibration(None)
    shipped = {e["id"]: e for e in list_models() if e.get("source") == "shipped"}
    assert panel.model_has_finding_calibration(shipped["normative-t1-ixi"])  # scripts/recalibrate_shipped.py
    assert not panel.model_has_finding_calibration(shipped["intensity-flair"])  # no healthy FLAIR cohort


def test_format_size():
    assert panel.format_size(5930) == "5.9 kB"
    assert panel.format_size(7748388) == "7.7 MB"
    assert panel.format_size(123456789) == "123 MB"
    assert panel.format_size(2.5e9) == "2.5 GB"
    assert panel.format_size(12) == "12 B"
    assert panel.format_size(None) == "size unknown"


SHIPPED = {"id": "normative-t1-ixi", "kind": "normative", "modality": "T1", "inputs": ["T1"],
           "description": "normative scorer for T1", "size_bytes": 7748388, "source": "shipped"}
USER = {"id": "my-flair", "kind": "intensity", "modality": None, "inputs": ["FLAIR"], "description": "",
        "size_bytes": 4000, "source": "user"}


def test_model_texts():
    assert panel.model_item_text(SHIPPED, "normative-t1-ixi") == "normative-t1-ixi (T1, default)"
    assert panel.model_item_text(USER, "normative-t1-ixi") == "my-flair (FLAIR, yours)"
    details = panel.model_details(SHIPPED)
    assert details.splitlines()[0] == "normative scorer for T1"
    assert "modality T1" in details and "7.7 MB" in details and "normative" in details and "shipped" in details
    assert panel.model_details(USER).startswith("modality FLAIR")
    assert "Import" in panel.model_details(None)


def test_a_fusion_model_asks_for_its_other_contrasts():
    fusion = {"id": "f", "kind": "fusion", "modality": "T1", "inputs": ["T1", "T2", "FLAIR"], "size_bytes": 9000,
              "source": "shipped"}
    assert panel.other_contrasts(fusion) == ["T2", "FLAIR"]
    assert panel.other_contrasts(SHIPPED) == [] and panel.other_contrasts(None) == []
    assert "contrasts T1 + T2 + FLAIR" in panel.model_details(fusion)
    assert panel.guess_modality(fusion) == "T1"  # the input volume's contrast


def test_guess_modality():
    assert panel.guess_modality(SHIPPED) == "T1"
    assert panel.guess_modality(USER) == "FLAIR"
    assert panel.guess_modality({"id": "x"}) == ""
    assert panel.guess_modality(None) == ""


def test_model_index_prefers_the_chosen_then_the_default():
    entries = [USER, SHIPPED]
    assert panel.model_index(entries, "my-flair", "normative-t1-ixi") == 0
    assert panel.model_index(entries, "gone", "normative-t1-ixi") == 1
    assert panel.model_index(entries, None, None) == 0
    assert panel.model_index([], "x", "y") == -1


def test_modality_choices_add_the_models_own():
    out = panel.modality_choices([SHIPPED, {"id": "z", "modality": "SWI"}])
    assert out[: len(panel.MODALITIES)] == list(panel.MODALITIES) and out[-1] == "SWI"
    assert len(out) == len(set(out))


def test_model_source(tmp_path):
    assert panel.model_source(tmp_path / "m" / "model.json") == tmp_path / "m"
    assert panel.model_source(tmp_path / "m.zip") == tmp_path / "m.zip"
    assert panel.model_source(tmp_path / "m") == tmp_path / "m"


def test_already_installed_matches_model_store_message(tmp_path):
    """The panel offers to replace a model only for import_model's 'already installed' refusal."""
    from BrainAnomalyLib.core.errors import ModelError
    from BrainAnomalyLib.store.model_store import ModelExistsError

    assert panel.is_already_installed(ModelExistsError("a model named 'x' is already installed in /y"))
    assert not panel.is_already_installed(ModelError("a model named 'x' is already installed (but not the type)"))
    assert not panel.is_already_installed(ModelError("model x: model.safetensors does not match its checksum"))


def test_describe_devices_from_the_workers_answer():
    # The panel never imports torch: it shows what `worker --list-devices` answered.
    one = {"event": "devices", "torch": "2.5.1", "cuda": [{"name": "Fake GPU", "memory_gb": 16.0}]}
    assert panel.describe_devices(one) == "GPU found: Fake GPU, 16 GB"
    two = dict(one, cuda=one["cuda"] * 2)
    assert "+1 more" in panel.describe_devices(two)
    assert "CPU" in panel.describe_devices({"torch": "2.5.1", "cuda": []})
    assert "CPU" in panel.describe_devices({"torch": "2.5.1", "cuda": [], "error": "RuntimeError: driver"})
    assert "not installed" in panel.describe_devices({"torch": None, "cuda": []})
    assert "Looking" in panel.describe_devices(None)
    assert "Cannot tell" in panel.describe_devices({"error": "exit code 1"})


def test_worker_lists_devices_without_input(tmp_path):
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "BrainAnomalyLib.worker", "--list-devices"], capture_output=True,
                          text=True, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["event"] == "devices" and "torch" in answer and isinstance(answer["cuda"], list)
    assert panel.describe_devices(answer)
    missing = subprocess.run([sys.executable, "-m", "BrainAnomalyLib.worker"], capture_output=True, text=True,
                             cwd=str(ROOT), timeout=120)
    error = json.loads(missing.stdout.strip().splitlines()[-1])  # reported on the protocol stream, as any bad input
    assert missing.returncode == 2 and error["event"] == "error" and error["exit_code"] == 2
    assert "needs an input volume and an output folder" in error["message"]


def test_worker_device_listing_with_a_gpu(monkeypatch):
    # No GPU where this is developed: the CUDA branch of the worker's answer against a stand-in torch.
    import types

    from BrainAnomalyLib import worker

    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 get_device_name=lambda i: f"GPU {i}",
                                 get_device_properties=lambda i: types.SimpleNamespace(total_memory=80 * 2 ** 30))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.5.1", cuda=cuda))
    answer = worker.list_devices()
    assert answer == {"torch": "2.5.1", "cuda": [{"name": "GPU 0", "memory_gb": 80.0},
                                                 {"name": "GPU 1", "memory_gb": 80.0}]}
    assert panel.describe_devices(answer) == "GPU found: GPU 0, 80 GB (+1 more)"

    def broken():
        raise RuntimeError("driver too old")

    monkeypatch.setattr(cuda, "is_available", broken)
    assert "driver too old" in panel.describe_devices(worker.list_devices())


class _WrapperOfSlicer58:
    """What matters of Slicer 5.8's parameter node wrapper: connectGui returns no tag; connectParametersToGui does;
    each call adds a set of connectors that writes the node until disconnectGui(tag) removes it."""

    def __init__(self):
        self.connected = {}
        self._next = 0

    def connectGui(self, gui):
        self.connectParametersToGui({})

    def connectParametersToGui(self, mapping):
        tag, self._next = self._next, self._next + 1
        self.connected[tag] = dict(mapping)
        return tag

    def disconnectGui(self, tag):
        self.connected.pop(tag, None)


class _Widget:
    def __init__(self, name):
        self.name = name

    def property(self, key):
        return self.name if key == "SlicerParameterName" else None


def test_gui_binding_keeps_one_set_of_connectors_across_module_entries():
    node, other = _WrapperOfSlicer58(), _WrapperOfSlicer58()
    widgets = [_Widget("device"), _Widget("fprLog10Percent"), _Widget(None), object()]
    binding = panel.GuiBinding()
    for _ in range(3):  # enter, exit, enter again ...
        binding.bind(node, widgets)
        assert list(node.connected.values()) == [{"device": widgets[0], "fprLog10Percent": widgets[1]}]
        binding.unbind()
        assert node.connected == {}
    binding.bind(node, widgets)
    binding.bind(node, widgets)  # entered twice without an exit (scene closed and reopened)
    assert len(node.connected) == 1
    binding.bind(other, widgets)  # another parameter node: the first one lets go
    assert node.connected == {} and len(other.connected) == 1


def test_detection_options():
    opts = panel.detection_options(model="normative-t1-ixi", modality=" T1 ", device="cuda", skull_strip=False,
                                   bias_correction=False, registration=True, fpr=0.005, min_lesion_ml=0.2,
                                   per_lesion=True, create_new=True, voxel_threshold=True)
    assert opts.model == "normative-t1-ixi" and opts.modality == "T1" and opts.device == "cuda"
    assert opts.skull_strip == "none" and not opts.bias_correction and opts.registration
    assert opts.fpr == pytest.approx(0.005) and opts.min_lesion_ml == pytest.approx(0.2)
    assert opts.per_lesion_segments and not opts.reuse_outputs
    request = opts.request(Path("in.nrrd"), Path("out"))  # what the worker reads, built by the library
    assert not request.preprocessing.bias_correction and request.preprocessing.registration
    assert request.postprocessing.min_lesion_ml == pytest.approx(0.2)  # the worker's table uses it
    assert request.preprocessing.skull_strip == "none" and request.threshold.fpr == pytest.approx(0.005)
    assert request.model == "normative-t1-ixi" and request.output_format == "nrrd"

    default = panel.detection_options(model="", modality="")
    assert default.model is None and default.modality is None and default.skull_strip == "auto"
    assert default.reuse_outputs and default.device == "auto"
    assert default.false_findings == 0.5 and default.fpr is None
    findings = panel.detection_options(model=None, modality=None, fpr=0.005, false_findings=2.0)
    assert findings.request(Path("in.nrrd"), Path("out")).threshold.false_findings == 2.0
    assert findings.fpr is None
    # The voxel threshold on request, and for a model without a finding calibration (it would refuse the target).
    for voxel in (dict(voxel_threshold=True), dict(finding_calibrated=False)):
        opts = panel.detection_options(model=None, modality=None, fpr=0.005, false_findings=2.0, **voxel)
        threshold = opts.request(Path("in.nrrd"), Path("out")).threshold
        assert (threshold.fpr, threshold.false_findings) == (0.005, None)
    with pytest.raises(ValueError):
        panel.detection_options(model=None, modality=None, device="tpu")


def test_progress_state():
    assert panel.progress_state({"event": "progress", "step": "register", "fraction": 0.42}) == (42, "register: %p%")
    assert panel.progress_state({"event": "progress", "step": "50% done", "fraction": 2.0}) == (100, "50%% done: %p%")
    assert panel.progress_state({"event": "log", "message": "x"}) is None


def test_event_log_lines():
    assert panel.event_log_line({"event": "log", "message": "model x on cpu"}) == "model x on cpu"
    assert panel.event_log_line({"event": "progress", "step": "register", "fraction": 0.1}) == "register…"
    assert panel.event_log_line({"event": "progress", "step": "register", "fraction": 0.2}, "register") is None
    assert panel.event_log_line({"event": "started", "device": "cpu"}).endswith("(device cpu)")
    line = panel.event_log_line({"event": "error", "kind": "BadInputError", "message": "constant image"})
    assert "BadInputError" in line and "constant image" in line
    assert panel.event_log_line({"event": "done"})
    assert panel.event_log_line({"event": "unknown"}) is None


def test_result_summary():
    result = {"threshold": 2.345, "fpr": 0.01, "lesions": [{"volume_ml": 1.5}, {"volume_ml": 0.25}]}
    assert panel.result_summary(result) == "2 lesions, 1.75 mL at score ≥ 2.35 (1.00 % healthy FPR)"
    assert panel.result_summary({"threshold": 1.0, "fpr": None, "lesions": [{"volume_ml": 1}]}) == \
        "1 lesion, 1.00 mL at score ≥ 1.00"
    assert panel.result_summary({"lesions": []}) == "0 lesions, 0.00 mL"
    at_findings = dict(result, false_findings=0.5)
    assert panel.result_summary(at_findings) == "2 lesions, 1.75 mL at 0.5 false findings per healthy scan"


def test_state_summary():
    assert panel.state_summary({"n_lesions": 1, "threshold": 3.371, "fpr": 0.005}) == \
        "1 lesion at score ≥ 3.37 (0.50 % healthy FPR)"
    assert panel.state_summary({"n_lesions": 0, "threshold": 1.0, "fpr": None}) == "0 lesions at score ≥ 1.00"
    assert panel.state_summary({}) == "lesions not counted yet"
    assert panel.state_summary({"n_lesions": 3, "threshold": 1.7, "fpr": 0.01, "false_findings": 0.2}) == \
        "3 lesions at 0.2 false findings per healthy scan"
    assert panel.state_summary({"n_lesions": 2, "device": "cuda"}) == "2 lesions; ran on cuda"  # what really ran
    assert panel.run_notes({"notes": ["out of memory at batch 32; scored with batch 8"]}) == \
        ["Note: out of memory at batch 32; scored with batch 8"]
    assert panel.run_notes({}) == []


def test_panel_module_needs_neither_qt_nor_torch():
    import subprocess

    code = ("import sys; sys.path.insert(0, 'BrainAnomaly'); import BrainAnomalySlicer.panel; "
            "bad = [m for m in ('torch', 'qt', 'monai', 'slicer') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_defaults_are_the_librarys():
    from BrainAnomalyLib.calibration import curve, findings
    from BrainAnomalySlicer.logic import DetectionOptions

    assert panel.DEFAULT_FPR == curve.DEFAULT_FPR and panel.DEFAULT_FALSE_FINDINGS == findings.DEFAULT_FALSE_FINDINGS
    assert math.isclose(panel.slider_to_fpr(panel.fpr_to_slider(None)), curve.DEFAULT_FPR)
    # A bare DetectionOptions asks for neither: the model's own default operating point (choose_threshold).
    options = DetectionOptions()
    assert options.fpr is None and options.false_findings is None
    request = options.request(Path("in.nrrd"), Path("out"))
    assert request.threshold.fpr is None and request.threshold.false_findings is None

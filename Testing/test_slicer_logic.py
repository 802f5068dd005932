"""The module's logic with real MRML (slicer-core) and the real inference worker process: outputs in the scene,
re-thresholding without a model run, node reuse, and nothing left behind after errors or cancel."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("slicer", reason="the slicer-core wheel is part of requirements.txt")

from BrainAnomalySlicer import nodes  # noqa: E402
from BrainAnomalySlicer.logic import DetectionError, DetectionLogic, DetectionOptions  # noqa: E402


def _input_node(scene, image, name="scan"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    nodes.update_node_from_image(node, image)
    return node


def _outputs_copy(worker_output, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(worker_output / "out", dst)
    return dst


def _node_ids(scene):
    scene.GetSubjectHierarchyNode()
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_outputs_on_the_input_grid_with_display_and_table(mrml_scene, worker_output, tmp_path):
    scan = sitk.ReadImage(str(worker_output / "scan.nrrd"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(worker_output / "truth.nrrd"))) > 0
    summary = json.loads((worker_output / "out" / "result.json").read_text(encoding="utf-8"))
    scan_node = _input_node(mrml_scene, scan)
    logic = DetectionLogic(mrml_scene)
    out = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path), DetectionOptions())
    assert set(out.nodes()) == {"heatmap", "labelmap", "segmentation", "table", "reconstruction"}
    # Same grid as the (oblique, anisotropic) input, voxel for voxel.
    for node in (out.heatmap, out.labelmap, out.reconstruction):
        assert node.GetImageData().GetDimensions() == scan_node.GetImageData().GetDimensions()
        assert np.allclose(nodes.node_ijk_to_ras(node), nodes.node_ijk_to_ras(scan_node), atol=1e-5)
    # Heatmap: hot colours over the calibrated range, transparent below the threshold.
    display = out.heatmap.GetDisplayNode()
    threshold = summary["threshold"]["value"]
    assert display.GetColorNodeID() == nodes.hot_colour_node(mrml_scene).GetID()
    assert display.GetWindowLevelMin() == pytest.approx(summary["display_range"][0])
    assert display.GetWindowLevelMax() == pytest.approx(summary["display_range"][1])
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(threshold)
    # Label map: the heatmap above the threshold, finding the inserted lesion.
    labels = nodes.node_array(out.labelmap)
    heat = nodes.node_array(out.heatmap)
    assert labels.any() and not labels[heat <= threshold].any()
    assert (labels > 0)[truth].mean() > 0.3
    # The same lesion table as the worker's own at that threshold, peak first.
    t = out.table.GetTable()
    assert t.GetNumberOfRows() == summary["n_lesions"]
    peaks = [t.GetValueByName(r, "max_score").ToDouble() for r in range(t.GetNumberOfRows())]
    assert peaks == sorted(peaks, reverse=True)
    assert peaks[0] == pytest.approx(summary["lesions"][0]["max_score"], rel=1e-4)
    seg = out.segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1 and seg.GetNthSegment(0).GetName() == "Anomaly"


def test_threshold_slider_rethresholds_without_a_model_run(mrml_scene, worker_output, tmp_path):
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    logic = DetectionLogic(mrml_scene)
    out = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path), DetectionOptions())
    heat_before = nodes.node_array(out.heatmap).copy()
    heat_mtime = out.heatmap.GetImageData().GetMTime()
    cal = logic.calibration(out)
    default = logic.state(out)
    strict = logic.apply_threshold(out, fpr=0.001)
    loose = logic.apply_threshold(out, fpr=0.05)
    assert strict["threshold"] == pytest.approx(cal.threshold(0.001))
    assert strict["threshold"] > default["threshold"] > loose["threshold"]
    assert out.heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(loose["threshold"])
    labels = nodes.node_array(out.labelmap) > 0
    assert labels.any() and not labels[heat_before <= loose["threshold"]].any()
    assert out.table.GetTable().GetNumberOfRows() == len(loose["lesions"]) >= len(strict["lesions"])
    # Dragging the slider moves only the display threshold; the label map follows on release.
    labels_before = nodes.node_array(out.labelmap).copy()
    moved = logic.preview_threshold(out, 0.002)
    assert moved == pytest.approx(cal.threshold(0.002))
    assert out.heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(moved)
    assert np.array_equal(nodes.node_array(out.labelmap), labels_before)
    # A raw value shows its FPR; the heatmap itself never changes.
    by_value = logic.apply_threshold(out, value=strict["threshold"])
    assert by_value["fpr"] == pytest.approx(0.001, rel=0.05)
    assert np.array_equal(nodes.node_array(out.heatmap), heat_before)
    assert out.heatmap.GetImageData().GetMTime() == heat_mtime
    # Minimum lesion size and per-lesion segments, also without a model run.
    many = logic.apply_threshold(out, fpr=0.05, per_lesion=True)
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == len(many["lesions"]) > 1
    big_only = logic.apply_threshold(out, fpr=0.05, min_lesion_ml=1.0)
    assert all(les["volume_ml"] >= 1.0 for les in big_only["lesions"])
    assert len(big_only["lesions"]) < len(many["lesions"])
    # The state lives on the node, so a new logic (e.g. after reopening the module) continues from it.
    assert DetectionLogic(mrml_scene).state(out)["min_lesion_ml"] == 1.0


def test_slider_reads_the_workers_scan_curve(mrml_scene, worker_output, tmp_path):
    from BrainAnomalyLib.calibration import CalibrationCurve

    summary = json.loads((worker_output / "out" / "result.json").read_text(encoding="utf-8"))
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    logic = DetectionLogic(mrml_scene)
    out = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path), DetectionOptions())
    cal = logic.calibration(out)
    assert isinstance(cal, CalibrationCurve) and cal.to_dict() == summary["scan_calibration"]
    # The worker's threshold, moved to this scan, lies on the curve it shipped for the scan.
    chosen = summary["threshold"]
    assert "scan-adaptive" in chosen["source"]
    assert cal.threshold(chosen["fpr"]) == pytest.approx(chosen["value"], rel=1e-12)
    assert cal.fpr(chosen["value"]) == pytest.approx(chosen["fpr"], rel=1e-9)
    # Without a curve (an uncalibrated model) the slider has nothing to map: the raw threshold stays.
    state = logic.state(out)
    out.heatmap.SetAttribute(nodes.CALIBRATION_ATTRIBUTE, json.dumps(dict(state, curve=None)))
    assert logic.calibration(out) is None
    assert logic.preview_threshold(out, 0.05) == state["threshold"]
    by_value = logic.apply_threshold(out, value=state["threshold"] + 0.5)
    assert by_value["threshold"] == state["threshold"] + 0.5 and by_value["fpr"] is None


def test_rerun_reuses_output_nodes_unless_asked_for_new_ones(mrml_scene, worker_output, tmp_path):
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    logic = DetectionLogic(mrml_scene)
    first = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path / "a"), DetectionOptions())
    count = mrml_scene.GetNumberOfNodes()
    second = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path / "b"), DetectionOptions())
    assert second.nodes() == first.nodes()
    assert mrml_scene.GetNumberOfNodes() == count
    third = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path / "c"),
                               DetectionOptions(reuse_outputs=False))
    assert third.heatmap is not first.heatmap and third.heatmap.GetName() != first.heatmap.GetName()
    assert logic.outputs_for(scan_node).heatmap is third.heatmap  # the newest is the current one


def test_unreadable_outputs_leave_no_nodes(mrml_scene, worker_output, tmp_path):
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    folder = _outputs_copy(worker_output, tmp_path)
    (folder / "anomaly_map.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    before = _node_ids(mrml_scene)
    with pytest.raises(DetectionError, match="unreadable outputs"):
        DetectionLogic(mrml_scene).load_outputs(scan_node, folder, DetectionOptions())
    assert _node_ids(mrml_scene) == before


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cancel_kills_the_worker_and_leaves_nothing(mrml_scene, demo_case):
    scan_node = _input_node(mrml_scene, demo_case[0])
    before = _node_ids(mrml_scene)
    events = []
    logic = DetectionLogic(mrml_scene)
    run = logic.start(scan_node, DetectionOptions(device="cpu"), events.append)
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "progress" for e in events) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.05)
    assert run.state == "running"
    pid = run.process.proc.pid
    asked = time.monotonic()
    run.cancel(wait=False)  # what the GUI does: returns at once, its poll timer finishes the job
    assert time.monotonic() - asked < 0.5
    while not run.poll():
        time.sleep(0.05)
    assert time.monotonic() - asked < 10
    assert run.state == "cancelled" and run.error.kind == "Cancelled"
    assert not _alive(pid) and not run.workdir.exists()
    with pytest.raises(DetectionError, match="cancelled"):
        logic.finish(run)
    assert _node_ids(mrml_scene) == before


def test_blocking_detect_cancel_callback(mrml_scene, demo_case):
    scan_node = _input_node(mrml_scene, demo_case[0])
    before = _node_ids(mrml_scene)
    started = time.monotonic()
    with pytest.raises(DetectionError) as info:
        DetectionLogic(mrml_scene).detect(scan_node, DetectionOptions(device="cpu"),
                                          cancel_requested=lambda: time.monotonic() - started > 1.0)
    assert info.value.kind == "Cancelled"
    assert _node_ids(mrml_scene) == before


def test_worker_errors_reach_the_caller_as_messages(mrml_scene, demo_case):
    logic = DetectionLogic(mrml_scene)
    flat = sitk.Image(30, 30, 1, sitk.sitkFloat32)  # a single slice: not a 3D scan
    flat_node = _input_node(mrml_scene, flat, "flat")
    before = _node_ids(mrml_scene)
    with pytest.raises(DetectionError) as info:
        logic.detect(flat_node, DetectionOptions(device="cpu"))
    assert info.value.kind == "BadInputError" and info.value.exit_code == 2
    scan_node = _input_node(mrml_scene, demo_case[0])
    before = _node_ids(mrml_scene)
    with pytest.raises(DetectionError, match="is for T1 scans but the input is FLAIR") as info:
        logic.detect(scan_node, DetectionOptions(device="cpu", modality="FLAIR"))
    assert info.value.kind == "BadInputError"
    with pytest.raises(DetectionError, match="no model named") as info:
        logic.detect(scan_node, DetectionOptions(device="cpu", model="no-such-model"))
    assert info.value.kind == "ModelError"
    assert _node_ids(mrml_scene) == before
    with pytest.raises(DetectionError, match="select an input volume"):
        logic.start(None, DetectionOptions())


class FakeWorker:
    """Stands in for the worker's process (the object the logic's process factory makes): no child process; it
    'runs' by copying a real worker's output folder, or reports the error it was given."""

    instances = []

    def __init__(self, command, env, cwd, source=None, error=None):
        self.command, self.env, self.cwd = command, env, cwd
        self.source, self.error = source, error
        self.cancelled = False
        self.returncode = None
        self._events = []
        FakeWorker.instances.append(self)

    def request(self):
        """The DetectionRequest the logic wrote for the worker."""
        return json.loads(Path(self.command[self.command.index("--request") + 1]).read_text(encoding="utf-8"))

    def start(self):
        out = self.request()["output"]
        if self.error:
            self._events.append({"event": "error", **self.error})
            self.returncode = self.error["exit_code"]
        else:
            shutil.copytree(self.source, out)
            self._events.append({"event": "done", "output_dir": out})
            self.returncode = 0
        return self

    def events(self):
        out, self._events = self._events, []
        return out

    def finished(self):
        return True

    def enforce_cancel(self):
        pass

    def stderr_tail(self, lines=15):
        return "fake worker"


def _factory(**kwargs):
    FakeWorker.instances.clear()
    return lambda command, env, cwd: FakeWorker(command, env, cwd, **kwargs)


def test_results_go_with_the_runs_own_input_and_keep_device_and_notes(mrml_scene, worker_output, tmp_path):
    out_dir = _outputs_copy(worker_output, tmp_path)
    summary = json.loads((out_dir / "result.json").read_text(encoding="utf-8"))
    summary.update(device="cuda", notes=["out of memory at batch 32; scored with batch 8"])
    (out_dir / "result.json").write_text(json.dumps(summary), encoding="utf-8")
    scan = sitk.ReadImage(str(worker_output / "scan.nrrd"))
    first, second = _input_node(mrml_scene, scan, "first"), _input_node(mrml_scene, scan, "second")
    logic = DetectionLogic(mrml_scene, process_factory=_factory(source=out_dir))
    run = logic.start(first, DetectionOptions(device="cuda", min_lesion_ml=0.3))
    request = FakeWorker.instances[0].request()
    assert request["postprocessing"]["min_lesion_ml"] == 0.3 and request["device"] == "cuda"
    # The user selects another scan while the run is in flight; the results still belong to the first one.
    run.wait()
    out = logic.finish(run)
    assert out.heatmap.GetAttribute(nodes.SOURCE_ATTRIBUTE) == first.GetID()
    assert logic.outputs_for(second).heatmap is None
    state = logic.state(out)
    assert state["device"] == "cuda" and state["notes"] == summary["notes"]
    assert state["min_lesion_ml"] == summary["min_lesion_ml"]  # what the worker's table was really made with
    # The table is the worker's own at its threshold (not recomputed), and the label map agrees with it.
    t = out.table.GetTable()
    assert t.GetNumberOfRows() == len(summary["lesions"])
    assert [t.GetValueByName(r, "voxels").ToInt() for r in range(t.GetNumberOfRows())] == \
        [les["voxels"] for les in summary["lesions"]]
    assert int((nodes.node_array(out.labelmap) > 0).sum()) == sum(les["voxels"] for les in summary["lesions"])
    assert logic.is_output(out.heatmap) and not logic.is_output(first)
    assert set(nodes.output_volume_ids(mrml_scene)) == {out.heatmap.GetID(), out.labelmap.GetID(),
                                                         out.reconstruction.GetID()}


def test_out_of_memory_is_reported_once_without_a_relaunch(mrml_scene, worker_output):
    # The worker retries the scoring step itself; the module only reports what finally happened.
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    before = _node_ids(mrml_scene)
    error = {"kind": "OutOfMemory", "message": "out of memory on cpu: MemoryError", "exit_code": 4}
    logic = DetectionLogic(mrml_scene, process_factory=_factory(error=error))
    with pytest.raises(DetectionError, match="out of memory on cpu") as info:
        logic.detect(scan_node, DetectionOptions(device="cpu"))
    assert info.value.kind == "OutOfMemory" and info.value.exit_code == 4
    assert len(FakeWorker.instances) == 1
    assert _node_ids(mrml_scene) == before


def test_device_query_reads_the_workers_answer():
    answer = {"event": "devices", "torch": "2.5.1", "cuda": []}

    class Listing(FakeWorker):
        def start(self):
            assert self.command[-1] == "--list-devices"
            self._events.append(answer)
            self.returncode = 0
            return self

    query = DetectionLogic(None, process_factory=lambda command, env, cwd: Listing(command, env, cwd)).query_devices()
    assert query.poll() == answer

    class Broken(FakeWorker):
        def start(self):
            self.returncode = 1
            return self

    query = DetectionLogic(None, process_factory=lambda command, env, cwd: Broken(command, env, cwd)).query_devices()
    assert "error" in query.poll()


def test_findings_slider_relabels_by_healthy_rate_without_a_model_run(mrml_scene, worker_output, tmp_path,
                                                                       calibrated_template_model):
    from BrainAnomalyLib.calibration import CalibrationCurve, FindingCalibration

    summary = json.loads((worker_output / "out" / "result.json").read_text(encoding="utf-8"))
    # a calibrated model works at its lesion-level operating point, the finding calibration of its healthy scans
    assert summary["threshold"]["false_findings"] == 0.5
    assert summary["finding_calibration"] == calibrated_template_model.meta["calibration"]["findings"]
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    logic = DetectionLogic(mrml_scene)
    logic.start = lambda *args, **kwargs: pytest.fail("re-thresholding started a model run")
    out = logic.load_outputs(scan_node, _outputs_copy(worker_output, tmp_path), DetectionOptions())
    state = logic.state(out)
    assert state["false_findings"] == 0.5 and state["findings"] == summary["finding_calibration"]
    # The worker's own table at its operating point, and a label map holding exactly those findings.
    t = out.table.GetTable()
    assert t.GetNumberOfRows() == summary["n_lesions"]
    assert int((nodes.node_array(out.labelmap) > 0).sum()) == sum(les["voxels"] for les in summary["lesions"])
    heat = nodes.node_array(out.heatmap).copy()
    base = summary["threshold"]["value"]
    findings = FindingCalibration.from_dict(summary["finding_calibration"])

    at = {}
    for target in (0.1, 0.5, 5.0):
        result = logic.apply_threshold(out, false_findings=target)
        at[target] = result
        assert result["false_findings"] == target and result["threshold"] == pytest.approx(base, rel=1e-9)
        assert result["finding_threshold"] == pytest.approx(findings.threshold(target))
        rates = [les["healthy_rate"] for les in result["lesions"]]
        assert all(r <= target for r in rates) and rates == sorted(rates)
        # The table says the same (its healthy_rate column, rarest first), one row per reported finding.
        t = out.table.GetTable()
        assert t.GetNumberOfRows() == len(result["lesions"])
        column = [t.GetValueByName(r, "healthy_rate").ToDouble() for r in range(t.GetNumberOfRows())]
        assert column == pytest.approx(rates) and column == sorted(column)
        # Label map voxels are the reported findings' voxels, nothing else; the display stays at the base threshold.
        labels = nodes.node_array(out.labelmap) > 0
        assert int(labels.sum()) == sum(les["voxels"] for les in result["lesions"])
        assert not labels[heat <= base].any()
        assert out.heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(base)
        assert logic.state(out)["false_findings"] == target and logic.state(out)["n_lesions"] == len(rates)

    def found(result):  # a finding is the same component at every target: the base threshold does not move
        return {tuple(les["centroid_ras"]) for les in result["lesions"]}

    assert found(at[0.1]) <= found(at[0.5]) <= found(at[5.0])
    assert len(at[0.5]["lesions"]) == summary["n_lesions"]
    assert len(at[5.0]["lesions"]) > len(at[0.1]["lesions"])  # the slider really changes what is reported
    # At the worker's own operating point the slider reproduces the worker's table.
    again = logic.apply_threshold(out, false_findings=0.5)
    assert [les["voxels"] for les in again["lesions"]] == [les["voxels"] for les in summary["lesions"]]
    assert [les["healthy_rate"] for les in again["lesions"]] == [les["healthy_rate"] for les in summary["lesions"]]
    # Per-lesion segments number the reported findings in rank order; the label map's numbers match the table.
    many = logic.apply_threshold(out, false_findings=5.0, per_lesion=True)
    assert out.segmentation.GetSegmentation().GetNumberOfSegments() == len(many["lesions"])
    from BrainAnomalyLib.detection.postprocess import label_array

    numbered, _ = label_array(heat, nodes.node_ijk_to_ras(out.heatmap), base, logic.state(out)["min_lesion_ml"],
                              numbered=True)
    assert sum(les["voxels"] for les in many["lesions"]) <= int((numbered > 0).sum())  # a subset of all components
    # Min lesion size changes keep the operating point in force.
    kept = logic.apply_threshold(out, min_lesion_ml=0.5)
    assert kept["false_findings"] == 5.0 and all(les["volume_ml"] >= 0.5 for les in kept["lesions"])
    # Dragging shows the finding score needed and leaves label map and display alone.
    labels_before = nodes.node_array(out.labelmap).copy()
    assert logic.preview_threshold(out, false_findings=0.2) == pytest.approx(findings.threshold(0.2))
    assert np.array_equal(nodes.node_array(out.labelmap), labels_before)
    assert out.heatmap.GetDisplayNode().GetLowerThreshold() == pytest.approx(base)
    # The voxel FPR stays reachable: every component above the threshold, no healthy rate; and back again.
    curve = CalibrationCurve.from_dict(summary["scan_calibration"])
    voxel = logic.apply_threshold(out, fpr=0.05)
    assert voxel["false_findings"] is None and voxel["threshold"] == pytest.approx(curve.threshold(0.05))
    assert all(les["healthy_rate"] is None for les in voxel["lesions"])
    assert np.isnan(out.table.GetTable().GetValueByName(0, "healthy_rate").ToDouble())
    labels = nodes.node_array(out.labelmap) > 0
    assert int(labels.sum()) == sum(les["voxels"] for les in voxel["lesions"])
    assert labels.any() and not labels[heat <= voxel["threshold"]].any()
    assert logic.state(out)["false_findings"] is None
    assert logic.apply_threshold(out, min_lesion_ml=0.05)["false_findings"] is None  # voxel mode stays in force
    back = logic.apply_threshold(out, false_findings=0.5)
    assert [les["voxels"] for les in back["lesions"]] == [les["voxels"] for les in summary["lesions"]]
    assert np.array_equal(nodes.node_array(out.heatmap), heat)
    with pytest.raises(DetectionError, match="between 0.05 and 10"):
        logic.apply_threshold(out, false_findings=20.0)
    with pytest.raises(DetectionError, match="not several"):
        logic.apply_threshold(out, false_findings=0.5, fpr=0.01)


def test_results_without_finding_calibration_keep_the_voxel_slider(mrml_scene, worker_output, tmp_path):
    # A result as a model without a finding calibration writes it (an uncalibrated model, or one calibrated
    # before findings were): no finding calibration, a voxel threshold, no healthy rates.
    folder = _outputs_copy(worker_output, tmp_path)
    summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    summary["finding_calibration"] = None
    for key in ("false_findings", "finding_threshold"):
        summary["threshold"].pop(key, None)
    for les in summary["lesions"]:
        les.update(finding_score=None, healthy_rate=None)
    (folder / "result.json").write_text(json.dumps(summary), encoding="utf-8")
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    logic = DetectionLogic(mrml_scene)
    out = logic.load_outputs(scan_node, folder, DetectionOptions())
    assert logic.state(out)["false_findings"] is None
    assert all(les["healthy_rate"] is None for les in summary["lesions"])
    before = nodes.node_array(out.labelmap).copy()
    with pytest.raises(DetectionError, match="no finding calibration") as info:
        logic.apply_threshold(out, false_findings=0.5)
    assert info.value.kind == "BadInputError"
    with pytest.raises(DetectionError, match="no finding calibration"):
        logic.preview_threshold(out, false_findings=0.5)
    assert np.array_equal(nodes.node_array(out.labelmap), before)  # nothing half-applied
    assert logic.apply_threshold(out, fpr=0.05)["fpr"] == pytest.approx(0.05)


def test_the_run_asks_for_the_operating_point_in_force(mrml_scene, worker_output, tmp_path):
    scan_node = _input_node(mrml_scene, sitk.ReadImage(str(worker_output / "scan.nrrd")))
    source = _outputs_copy(worker_output, tmp_path)
    logic = DetectionLogic(mrml_scene, process_factory=_factory(source=source))
    for options, expected in ((DetectionOptions(false_findings=2.0), (None, 2.0)),
                              (DetectionOptions(fpr=0.005), (0.005, None)), (DetectionOptions(), (None, None))):
        run = logic.start(scan_node, options)
        threshold = FakeWorker.instances[-1].request()["threshold"]
        run.cleanup()
        assert (threshold["fpr"], threshold["false_findings"]) == expected
    from BrainAnomalyLib.core.errors import BadInputError

    with pytest.raises(BadInputError, match="only one of"):
        logic.start(scan_node, DetectionOptions(fpr=0.01, false_findings=0.5))

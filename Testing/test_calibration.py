"""Healthy calibration over the whole brain mask, the dense FPR curve, and `brainanomaly calibrate`.

Data are made here, on the model grid, from the bundled template: each healthy scan gets its own blur, a mild
smooth intensity field, a global contrast and noise. The noise dominates the scan-to-scan variation on purpose:
with conftest.template_cohort (fields of several noise SDs that a normative model fitted on a handful of scans
cannot absorb) a scan's own FPR at a pooled 1 % threshold ranges from 0 to about 5 %, and 10 held-out scans give a
pooled FPR outside [0.5 %, 2 %] for about one split in four, which would make the held-out test a coin toss.
"""

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli import calibrate as calibrate_cli
from BrainAnomalyLib.calibration import (DEFAULT_FPRS, AdaptiveReference, CalibrationCurve, ScanMove, Threshold,
                                         calibration_tables, choose_threshold, thresholds_for_fpr)
from BrainAnomalyLib.core.errors import BrainAnomalyError, Cancelled
from BrainAnomalyLib.core.manifest import Case, write_manifest
from BrainAnomalyLib.core.files import folder_digest
from BrainAnomalyLib.store.models import load_model
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.core.progress import CancelToken, Reporter

PRE = PreprocessConfig(skull_strip="none", bias_correction=False, registration="none")


def healthy_scans(n: int, seed: int):
    """Healthy grid volumes (normalised image, brain mask) from the template, one random variation each."""
    from scipy import ndimage

    from BrainAnomalyLib.preprocess.normalise import normalise
    from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid

    grid = Grid()
    base = sitk.GetArrayFromImage(template_on_grid(grid)) * 1000.0
    mask = brain_mask_on_grid(grid)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in base.shape], indexing="ij", sparse=True)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a = rng.normal(0.0, 0.01, 4)
        field = 1.0 + a[0] * z + a[1] * y + a[2] * x + a[3] * y * x
        vol = ndimage.gaussian_filter(base, rng.uniform(0.5, 0.9)) * field + 60.0 * rng.standard_normal(base.shape)
        image, _ = normalise((vol * rng.uniform(0.8, 1.2)).astype(np.float32), mask)
        yield image, mask


def _write(image: np.ndarray, path: Path) -> Path:
    from BrainAnomalyLib.core.template import Grid

    img = sitk.GetImageFromArray(np.asarray(image, np.float32) * 100 + 400)
    img.CopyInformation(Grid().reference())
    sitk.WriteImage(img, str(path))
    return path


def _cases(folder: Path, prefix: str, n: int, seed: int):
    return [Case(f"{prefix}{i}", "T1", _write(image, folder / f"{prefix}{i}.nii.gz"), None)
            for i, (image, _) in enumerate(healthy_scans(n, seed))]


def _lesion_case(folder: Path, seed: int) -> Case:
    """A healthy scan with a dark sphere (T1 hypo-intense lesion) and its mask, on the grid."""
    from scipy import ndimage

    from BrainAnomalyLib.core.template import Grid

    image, mask = next(healthy_scans(1, seed))
    inner = ndimage.binary_erosion(mask, iterations=8)
    centre = np.argwhere(inner).mean(axis=0).round().astype(int)
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in mask.shape)]
    blob = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 16) & inner
    image = image.copy()
    image[blob] = np.maximum(image[blob] - 2.5, image.min() + 0.5)  # stays above the background value
    truth = sitk.GetImageFromArray(blob.astype(np.uint8))
    truth.CopyInformation(Grid().reference())
    sitk.WriteImage(truth, str(folder / "lesion_mask.nii.gz"))
    return Case("les0", "T1", _write(image, folder / "lesion.nii.gz"), folder / "lesion_mask.nii.gz")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from BrainAnomalyLib.training.run import train

    root = tmp_path_factory.mktemp("calibration")
    train_cases = _cases(root, "tr", 8, seed=31)
    cal_cases = _cases(root, "cal", 8, seed=32)
    held = _cases(root, "held", 6, seed=33)
    lesion = _lesion_case(root, seed=34)
    write_manifest(root / "train.csv", train_cases)
    write_manifest(root / "cal.csv", cal_cases + [lesion])  # the lesion row is not calibrated on
    write_manifest(root / "labelled.csv", [lesion])
    # 8 subjects hold out 1 for calibration: below the minimum, so allowed explicitly (and recorded)
    model = train("normative", root / "train.csv", "T1", root / "model", Reporter(), cache_dir=root / "cache",
                  pre=PRE, allow_few_scans=True)
    return SimpleNamespace(root=root, model=model, cache=root / "cache", held=held, lesion=lesion,
                           cal=root / "cal.csv", labelled=root / "labelled.csv")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="brainanomaly")
    calibrate_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["calibrate", *[str(a) for a in argv]])


def run_calibrate(argv, cancel=None):
    """(exit code, stdout, stderr) as `brainanomaly calibrate` would give them (cli.main maps the exceptions)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = calibrate_cli.run(_parse(argv), cancel or CancelToken())
        except BrainAnomalyError as exc:
            print(f"brainanomaly: {exc}", file=err)
            code = exc.exit_code
    return code, out.getvalue(), err.getvalue()


def _copy_model(data, dest: Path) -> Path:
    shutil.copytree(data.model, dest)
    return dest


@pytest.fixture(scope="module")
def calibrated(data):
    """The trained model re-calibrated on the calibration scans, written as a copy with -o."""
    before = (data.model / "model.json").read_bytes()
    out = data.root / "calibrated"
    code, stdout, stderr = run_calibrate(["--model", data.model, "--manifest", data.cal, "--cache-dir", data.cache,
                                          "-o", out, "-q"])
    assert code == 0, stderr
    return SimpleNamespace(folder=out, stdout=stdout, original_unchanged=(data.model / "model.json").read_bytes()
                           == before)


def _assert_curve(calib: dict, fprs=DEFAULT_FPRS):
    curve = calib["curve"]
    f, t = np.array(curve["fpr"]), np.array(curve["threshold"])
    assert f.size == t.size and 24 <= f.size <= 32
    assert f[0] == pytest.approx(1e-4) and f[-1] == pytest.approx(0.5)
    assert np.all(np.diff(f) > 0) and np.all(np.diff(t) <= 0)
    for k, v in calib["thresholds"].items():
        hit = np.isclose(f, float(k), rtol=1e-12, atol=0)
        assert hit.sum() == 1 and t[hit][0] == v
    assert sorted(float(k) for k in calib["thresholds"]) == sorted(fprs)


# --- the curve and the look-ups -------------------------------------------------------------------------------


def test_calibration_tables_curve_matches_the_table():
    rng = np.random.default_rng(0)
    values = [np.maximum(rng.standard_normal(50_000), 0), np.maximum(rng.standard_normal(30_000), 0)]
    tables = calibration_tables(values)
    _assert_curve(tables)
    assert tables["thresholds"] == pytest.approx(thresholds_for_fpr(values))
    pooled = np.concatenate(values)
    for k, v in tables["thresholds"].items():
        assert (pooled > v).mean() == pytest.approx(float(k), rel=0.02)
    with pytest.raises(ValueError):
        calibration_tables(values, (0.0, 0.01))


def test_train_stores_the_curve_over_the_whole_brain_mask(data):
    calib = json.loads((data.model / "model.json").read_text(encoding="utf-8"))["calibration"]
    _assert_curve(calib)
    assert "whole grid brain mask" in calib["method"]


def test_calibrate_pools_the_whole_brain_mask_eroded_voxels_count_as_zeros(data):
    from BrainAnomalyLib.store.cache import preprocessed_arrays
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.training.run import calibrate

    model = load_model(data.model)
    cases = data.held[:2]
    calib = calibrate(model, cases, Reporter(), data.cache, allow_few_scans=True)
    det = Detector(model, device="cpu")
    whole, inner = [], []
    for case in cases:
        image, mask = preprocessed_arrays(case.image, det.preprocess_config, det.grid, data.cache)
        scores = det.score_grid(image, mask)
        cleaned, eroded = scores.clean_map, scores.scoring_mask
        whole.append(cleaned[mask])
        inner.append(cleaned[eroded])
    assert calib["n_voxels"] == sum(v.size for v in whole) and calib["n_scans"] == 2
    assert calib["thresholds"] == pytest.approx(thresholds_for_fpr(whole))
    # Calibrating on the eroded region only would flag fewer voxels of the brain than promised.
    assert thresholds_for_fpr(inner)["0.01"] > calib["thresholds"]["0.01"]


@pytest.mark.parametrize("mode", ["cohort", "adaptive"])
def test_held_out_healthy_fpr_at_one_percent(data, calibrated, mode):
    """Calibrate on some healthy scans; on OTHER healthy scans the full detection path flags about 1 % of the
    brain at the 1 % threshold (pooled voxel FPR over the brain mask on the input grid), with the cohort
    threshold and with the scan-adaptive one."""
    from BrainAnomalyLib.core.io import read_volume
    from BrainAnomalyLib.detection.pipeline import Detector

    model = load_model(calibrated.folder)
    det = Detector(model, device="cpu", calibration=mode)
    flagged = brain = 0
    for case in data.held:
        result = det.run(read_volume(case.image), fpr=0.01)
        cohort = model.meta["calibration"]["thresholds"]["0.01"]
        if mode == "cohort":
            assert result.threshold["value"] == cohort
        else:
            assert result.threshold["cohort_value"] == cohort and "scan-adaptive" in result.threshold["source"]
        heat = sitk.GetArrayFromImage(result.anomaly_map)
        inside = sitk.GetArrayFromImage(result.brain_mask) > 0
        flagged += int((heat[inside] > result.threshold["value"]).sum())
        brain += int(inside.sum())
    fpr = flagged / brain
    assert 0.005 <= fpr <= 0.02, f"held-out healthy FPR {fpr:.4f} at the 1 % threshold"


def test_lesion_level_operating_point_on_held_out_scans(data, calibrated):
    """The default operating point (0.5 false findings per healthy scan, measured by `calibrate` on its healthy
    scans): OTHER healthy scans get few findings, and the lesion case's lesion is reported first."""
    from BrainAnomalyLib.core.io import read_volume
    from BrainAnomalyLib.detection.pipeline import Detector

    model = load_model(calibrated.folder)
    found = model.meta["calibration"]["findings"]
    assert found["n_scans"] == 8 == len(found["per_scan_scores"]) and found["n_findings"] > 0
    assert "false findings per healthy scan" in calibrated.stdout
    det = Detector(model, device="cpu")
    counts = []
    for case in data.held:
        result = det.run(read_volume(case.image))
        assert result.threshold["false_findings"] == 0.5 and "lesion-level" in result.threshold["source"]
        assert all(les["healthy_rate"] <= 0.5 for les in result.lesions)
        counts.append(len(result.lesions))
    assert np.mean(counts) <= 1.5, counts
    result = det.run(read_volume(data.lesion.image))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data.lesion.mask))) > 0
    assert result.lesions and result.lesions[0]["healthy_rate"] == min(les["healthy_rate"] for les in result.lesions)
    # the first finding is the lesion (its centroid lies within 3 voxels of the lesion's), and the label map holds it
    first = np.array(result.lesions[0]["centroid_ijk"][::-1])
    assert np.linalg.norm(first - np.argwhere(truth).mean(axis=0)) < 3.0
    assert (sitk.GetArrayFromImage(result.pred_mask)[truth] > 0).mean() > 0.3


def test_calibrated_copy_keeps_the_model_card(data, tmp_path):
    source = _copy_model(data, tmp_path / "carded")
    (source / "MODEL_CARD.md").write_text("# card\n")
    code, _, err = run_calibrate(["--model", source, "--manifest", data.cal, "--cache-dir", data.cache,
                                  "-o", tmp_path / "copy", "-q"])
    assert code == 0, err
    assert (tmp_path / "copy" / "MODEL_CARD.md").read_text() == "# card\n"
    load_model(tmp_path / "copy")


def test_round_trip_and_clamping(calibrated):
    meta = load_model(calibrated.folder).meta
    curve = CalibrationCurve.from_meta(meta)
    for f in list(np.geomspace(1.3e-4, 0.45, 17)) + list(DEFAULT_FPRS):
        assert curve.fpr(curve.threshold(f)) == pytest.approx(f, rel=1e-6)
    t = meta["calibration"]["curve"]["threshold"]
    assert curve.fpr(t[0] + 100.0) == pytest.approx(1e-4)
    assert curve.fpr(t[-1] - 100.0) == pytest.approx(0.5)
    assert curve.threshold(1e-6) == t[0] and curve.threshold(0.9) == t[-1]
    assert CalibrationCurve.from_meta({}) is None and CalibrationCurve.from_meta({"calibration": {}}) is None
    table_only = CalibrationCurve.from_meta({"calibration": {"thresholds": {"0.001": 6.0, "0.01": 4.0, "0.05": 3.0}}})
    assert table_only.fpr(5.0) == pytest.approx(np.sqrt(0.001 * 0.01))
    assert table_only.threshold(0.01) == 4.0
    with pytest.raises(ValueError):
        choose_threshold({}, fpr=0.01)


def test_choose_threshold_reads_the_curve_when_present():
    meta = {"calibration": {"thresholds": {"0.001": 6.0, "0.01": 4.0, "0.05": 3.0},
                            "curve": {"fpr": [0.001, 0.01, 0.02, 0.05], "threshold": [6.0, 4.0, 3.2, 3.0]}}}
    assert choose_threshold(meta, fpr=0.02).value == 3.2  # the table alone would interpolate to about 3.57
    assert choose_threshold(meta).value == 4.0 and choose_threshold(meta).fpr == 0.01
    assert choose_threshold(meta, threshold=1.5).value == 1.5
    with pytest.raises(ValueError):
        choose_threshold(meta, fpr=0.0)


def test_score_to_unit_is_monotone_within_unit_interval(calibrated):
    meta = load_model(calibrated.folder).meta
    curve = CalibrationCurve.from_meta(meta)
    score_to_unit = curve.score_to_unit
    t = np.array(meta["calibration"]["curve"]["threshold"])
    scores = np.linspace(-1.0, 2.0 * t[0] + 1.0, 4001)
    u = score_to_unit(scores)
    assert u.shape == scores.shape and u.min() >= 0.0 and u.max() <= 1.0
    assert np.all(np.diff(u) >= 0)
    on_curve = (scores > t[-1]) & (scores <= t[0])
    assert np.all(np.diff(u[on_curve]) > 0)
    assert score_to_unit(np.array([-1.0, 0.0])).tolist() == [0.0, 0.0]
    assert score_to_unit(np.array([curve.threshold(0.01)]))[0] == pytest.approx(0.99)
    assert score_to_unit(np.array([t[0]]))[0] == pytest.approx(1 - 1e-4)
    top = score_to_unit(np.array([t[0] + 0.5, t[0] + 5.0]))
    assert 1 - 1e-4 < top[0] < top[1] <= 1.0
    vol = np.zeros((3, 4, 5), np.float32)
    assert score_to_unit(vol).shape == (3, 4, 5)


# --- brainanomaly calibrate --------------------------------------------------------------------------------------


def test_calibrate_writes_a_copy_with_output(data, calibrated):
    assert calibrated.original_unchanged
    model = load_model(calibrated.folder)  # checksums of the rewritten folder hold
    calib = model.meta["calibration"]
    _assert_curve(calib)
    assert calib["n_scans"] == 8 and calib["manifest"] == "cal.csv" and "les0" not in calib["subjects"]
    assert model.meta["kind"] == "normative" and model.tensors.keys() == load_model(data.model).tensors.keys()
    assert "1 %" in calibrated.stdout and str(calibrated.folder) in calibrated.stdout
    assert f"{calib['thresholds']['0.01']:.4g}" in calibrated.stdout


def test_shipped_model_is_not_modified_in_place(data, tmp_path, monkeypatch):
    models_dir = tmp_path / "Resources" / "Models"
    folder = _copy_model(data, models_dir / "site-t1")
    digest = folder_digest(folder)
    (models_dir / "models.json").write_text(json.dumps(
        {"default": "site-t1", "models": [{"id": "site-t1", "path": "site-t1", "kind": "normative",
                                            "modality": "T1", "sha256": digest}]}))
    monkeypatch.setenv("BRAINANOMALY_RESOURCES", str(tmp_path / "Resources"))
    for model in ("site-t1", folder):
        code, _, err = run_calibrate(["--model", model, "--manifest", data.cal, "--cache-dir", data.cache, "-q"])
        assert code == 2 and "-o" in err and "shipped" in err
    code, _, err = run_calibrate(["--model", "site-t1", "--manifest", data.cal, "--cache-dir", data.cache,
                                  "-o", folder, "-q"])
    assert code == 2
    assert folder_digest(folder) == digest
    code, out, err = run_calibrate(["--model", "site-t1", "--manifest", data.cal, "--cache-dir", data.cache,
                                    "-o", tmp_path / "site-copy", "-q"])
    assert code == 0, err
    assert load_model(tmp_path / "site-copy").meta["calibration"]["manifest"] == "cal.csv"
    assert folder_digest(folder) == digest


def test_user_model_is_updated_in_place(data, tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINANOMALY_MODELS_DIR", str(tmp_path / "user"))
    folder = _copy_model(data, tmp_path / "user" / "mine")
    code, out, err = run_calibrate(["--model", "mine", "--manifest", data.cal, "--fprs", "0.002,0.02",
                                    "--cache-dir", data.cache, "-q"])
    assert code == 0, err
    calib = load_model(folder).meta["calibration"]
    assert set(calib["thresholds"]) == {"0.002", "0.02"} and calib["manifest"] == "cal.csv"
    _assert_curve(calib, (0.002, 0.02))
    assert "updated in place" in out and str(folder) in out


def test_labelled_cases_store_a_separate_threshold(data, calibrated, tmp_path):
    out = tmp_path / "labelled-model"
    code, stdout, err = run_calibrate(["--model", data.model, "--manifest", data.cal, "--labelled", data.labelled,
                                       "--cache-dir", data.cache, "-o", out, "-q"])
    assert code == 0, err
    meta = load_model(out).meta
    calib = meta["calibration"]
    lab = calib["labelled"]
    assert lab["n_cases"] == 1 and lab["subjects"] == ["les0"] and lab["dice"] > 0.5
    assert lab["healthy_fpr"] == pytest.approx(CalibrationCurve.from_meta(meta).fpr(lab["threshold"]))
    assert 1e-4 <= lab["healthy_fpr"] <= 0.5
    # The label-free calibration is the same as without --labelled, and stays the default.
    assert calib["thresholds"] == load_model(calibrated.folder).meta["calibration"]["thresholds"]
    assert choose_threshold(meta).value == calib["thresholds"]["0.01"]
    assert "labelled" in stdout and f"{lab['threshold']:.4g}" in stdout


def test_exit_codes(data, tmp_path):
    base = ["--cache-dir", data.cache, "-q"]
    assert run_calibrate(["--model", data.model, "--manifest", tmp_path / "missing.csv", *base])[0] == 2
    code, _, err = run_calibrate(["--model", "no-such-model", "--manifest", data.cal, *base])
    assert code == 3 and "no-such-model" in err
    assert run_calibrate(["--model", data.model, "--manifest", data.cal, "--fprs", "0.01,2", *base])[0] == 2
    assert run_calibrate(["--model", data.model, "--manifest", data.cal, "--fprs", "one", *base])[0] == 2
    # a manifest with only lesion rows has nothing healthy to calibrate on
    assert run_calibrate(["--model", data.model, "--manifest", data.labelled, *base])[0] == 2
    # --labelled with no labelled rows
    assert run_calibrate(["--model", data.model, "--manifest", data.cal, "--labelled", data.root / "train.csv",
                          *base])[0] == 2
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert run_calibrate(["--model", data.model, "--manifest", data.cal, "-o", other, *base])[0] == 2
    assert (other / "notes.txt").is_file()


def test_cancel_leaves_the_model_untouched(data, tmp_path):
    folder = _copy_model(data, tmp_path / "model")
    before = folder_digest(folder)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        calibrate_cli.run(_parse(["--model", folder, "--manifest", data.cal, "--cache-dir", data.cache, "-q"]),
                          token)
    assert folder_digest(folder) == before


def test_in_place_calibration_failing_while_writing_keeps_the_model(data, tmp_path, monkeypatch):
    """A disk error half way through rewriting the model's own folder: one clear line, exit code 2, and the
    previous model byte for byte as it was, still loading and verifying."""
    from safetensors import numpy as st

    folder = _copy_model(data, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    digest = folder_digest(folder)
    real = st.save_file

    def half_then_fail(tensors, path, *a, **k):  # the new tensor file half written, model.json not yet
        real(tensors, path, *a, **k)
        Path(path).write_bytes(Path(path).read_bytes()[:64])
        raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", half_then_fail)
    code, _, err = run_calibrate(["--model", folder, "--manifest", data.cal, "--cache-dir", data.cache, "-q"])
    monkeypatch.undo()
    assert code == 2 and "cannot write the model" in err and "No space left" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_model(folder, expected_digest=digest).meta == load_model(data.model).meta
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_scan_adaptive_threshold_follows_a_shifted_and_widened_scan():
    ref = AdaptiveReference.from_stats([{"median": 0.0, "mad": 1.0}, {"median": 0.2, "mad": 1.2},
                                        {"median": -0.2, "mad": 0.8}])
    chosen = Threshold(2.5, 0.01, "healthy calibration")
    same = chosen.moved(ScanMove.between(ref, {"median": 0.0, "mad": 1.0}))
    assert same.value == pytest.approx(2.5) and "scan-adaptive" in same.source
    # a scan whose normal tissue scores 0.5 higher and twice as spread: the 1 % point moves with it
    moved = chosen.moved(ScanMove.between(ref, {"median": 0.5, "mad": 2.0}))
    assert moved.value == pytest.approx(0.5 + 2.5 * 2.0) and moved.cohort_value == 2.5
    assert moved.to_dict()["adaptive"]["scale_ratio"] == 2.0
    assert chosen.moved(ScanMove.between(ref, {"median": 0.0, "mad": 100.0})).to_dict()["adaptive"]["scale_ratio"] \
        == 4.0
    # user values and uncalibrated models are left alone
    user = Threshold(3.0, None, "user value")
    assert user.moved(ScanMove.between(ref, {"median": 1.0, "mad": 2.0})) is user
    assert chosen.moved(ScanMove.between(AdaptiveReference.from_meta({}), {"median": 1.0, "mad": 2.0})) is chosen


def test_adaptive_calibration_keeps_the_healthy_rate_on_a_scanner_shifted_scan():
    """Healthy scans from a 'new scanner' (stronger noise, other contrast): the cohort threshold flags far more
    than 1 %; the scan-adaptive one comes back near it."""
    from BrainAnomalyLib.detection.postprocess import PostprocessConfig, filter_map, robust_stats

    rng = np.random.default_rng(0)
    post = PostprocessConfig(erode_voxels=0, median_size=1)
    shape = (20, 30, 30)
    healthy = [rng.normal(0, 1, shape).astype(np.float32) for _ in range(4)]
    stats = [robust_stats(filter_map(h, post).ravel()) for h in healthy]
    ref = AdaptiveReference.from_stats(stats)
    chosen = Threshold(thresholds_for_fpr([h.ravel() for h in healthy])["0.01"], 0.01, "cal")
    shifted = rng.normal(0.4, 1.8, shape).astype(np.float32)
    cohort_fpr = (shifted > chosen.value).mean()
    adapted = chosen.moved(ScanMove.between(ref, robust_stats(filter_map(shifted, post).ravel())))
    adaptive_fpr = (shifted > adapted.value).mean()
    assert cohort_fpr > 0.08 and 0.005 < adaptive_fpr < 0.02


def test_scan_relative_scorers_keep_the_cohort_threshold(intensity_model, template_normative_model):
    from BrainAnomalyLib.detection.pipeline import Detector, GridScores

    stats = GridScores(None, None, None, None, {"median": 3.0, "mad": 5.0})
    chosen = Threshold(1.2, 0.01, "healthy calibration")
    kept = Detector(intensity_model, device="cpu").for_scan(chosen, stats)
    assert kept.value == 1.2 and "already scan-adaptive" in kept.source
    moved = Detector(template_normative_model, device="cpu").for_scan(chosen, stats)
    assert moved.value != 1.2 and "scan-adaptive" in moved.source
    cohort = Detector(template_normative_model, device="cpu", calibration="cohort").for_scan(chosen, stats)
    assert cohort is chosen


# --- the typed objects ------------------------------------------------------------------------------------------


def test_threshold_record_keeps_the_result_json_keys():
    cohort = Threshold(4.0, 0.01, "healthy calibration (20 scans)")
    assert cohort.to_dict() == {"value": 4.0, "fpr": 0.01, "source": "healthy calibration (20 scans)"}
    assert Threshold(7.5).to_dict() == {"value": 7.5, "fpr": None, "source": "user value"}
    moved = cohort.moved(ScanMove.between(AdaptiveReference(0.1, 0.5, 12), {"median": 0.4, "mad": 1.5}))
    record = moved.to_dict()
    assert list(record) == ["value", "fpr", "source", "cohort_value", "adaptive"]
    assert record["fpr"] == 0.01 and record["cohort_value"] == 4.0
    assert record["source"] == "healthy calibration (20 scans), scan-adaptive"
    assert record["adaptive"] == {"scan_median": 0.4, "scan_mad": 1.5, "cohort_median": 0.1, "cohort_mad": 0.5,
                                  "scale_ratio": 3.0}
    assert json.loads(json.dumps(record)) == record
    assert cohort.noted("; why").to_dict()["source"] == "healthy calibration (20 scans); why"


def test_scan_move_worked_example():
    """Cohort median 0.1 and MAD 0.5, scan median 0.4 and MAD 1.5: ratio 3, so a cohort threshold of 2.1 lands on
    0.4 + (2.1 - 0.1) * 3 = 6.4, and the scan's curve moves every point the same way."""
    ref = AdaptiveReference.from_stats([{"median": 0.0, "mad": 0.4}, {"median": 0.1, "mad": 0.5},
                                        {"median": 0.3, "mad": 0.9}])
    assert ref.to_dict() == {"median": 0.1, "mad": 0.5, "n_scans": 3}
    assert AdaptiveReference.from_meta({"calibration": {"adaptive": ref.to_dict()}}) == ref
    move = ScanMove.between(ref, {"median": 0.4, "mad": 1.5})
    assert move.ratio == pytest.approx(3.0)
    moved = Threshold(2.1, 0.01, "cal").moved(move)
    assert moved.value == pytest.approx(6.4) and moved.cohort_value == 2.1 and moved.adaptive is move
    curve = CalibrationCurve.from_dict({"fpr": [0.001, 0.01, 0.05], "threshold": [3.1, 2.1, 1.1]})
    scan = curve.moved(move)
    assert scan.to_dict() == {"fpr": [0.001, 0.01, 0.05], "threshold": pytest.approx([9.4, 6.4, 3.4])}
    assert scan.threshold(0.01) == moved.value  # the scan's threshold lies on the scan's curve
    assert scan.fpr(moved.value) == pytest.approx(0.01)
    # spreads outside 0.5 to 4 times the cohort's are clamped; a degenerate one moves nothing
    assert ScanMove.between(ref, {"median": 0.4, "mad": 0.05}).ratio == 0.5
    assert ScanMove.between(ref, {"median": 0.4, "mad": 0.0}) is None
    assert curve.moved(None) is curve


def test_curve_from_a_plain_dict_round_trips():
    """The curve as the worker ships it to the Slicer module (JSON), read both ways like the model's own."""
    rng = np.random.default_rng(1)
    tables = calibration_tables([rng.gamma(2.0, 1.0, 100_000)])
    shipped = CalibrationCurve.from_dict(json.loads(json.dumps(tables["curve"])))
    model = CalibrationCurve.from_calibration(tables)
    assert shipped.to_dict() == tables["curve"] and not shipped.table and model.table == tables["thresholds"]
    for f in list(np.geomspace(1.2e-4, 0.45, 23)) + list(DEFAULT_FPRS):
        assert shipped.threshold(f) == model.threshold(f)
        assert shipped.fpr(shipped.threshold(f)) == pytest.approx(f, rel=1e-6)
    for k, v in tables["thresholds"].items():
        assert shipped.threshold(float(k)) == v
    for bad in (None, {}, {"fpr": [0.01], "threshold": []}, {"fpr": [], "threshold": []}):
        assert CalibrationCurve.from_dict(bad) is None
    with pytest.raises(ValueError):
        shipped.threshold(1.0)


def test_labelled_refinement_kept_across_recalibration_with_its_new_healthy_fpr():
    from BrainAnomalyLib.calibration import labelled_refinement, with_labelled

    lab = labelled_refinement(0.61234, 2.5, ["b", "a", "a"], ["c: unreadable"], 40, 4000)
    assert lab["threshold"] == float(np.nextafter(np.float32(2.5), np.float32(-np.inf))) < 2.5
    assert (lab["dice"], lab["n_cases"], lab["subjects"]) == (0.6123, 3, ["a", "b"])
    old = {"curve": {"fpr": [0.001, 0.01, 0.1], "threshold": [4.0, 3.0, 2.0]}}
    new = {"curve": {"fpr": [0.001, 0.01, 0.1], "threshold": [3.0, 2.5, 1.0]}}
    first = with_labelled(old, dict(lab))["labelled"]
    assert first["healthy_fpr"] == pytest.approx(np.sqrt(0.01 * 0.1), rel=1e-5)  # half-way from 3.0 to 2.0
    # Re-calibrated without labelled cases: the raw threshold stays, what it means on healthy scans follows.
    again = with_labelled(new, None, first)["labelled"]
    assert again["threshold"] == lab["threshold"] and again["healthy_fpr"] == pytest.approx(0.01, rel=1e-6)
    assert "labelled" not in with_labelled({"curve": new["curve"]}, None, None)
    assert "labelled" not in with_labelled({"curve": new["curve"]}, None, {"threshold": None})


def test_calibrate_on_one_split_of_the_manifest(data):
    """--split calibration: only the subjects `brainanomaly train` holds out for calibration, so a model built
    from trained ones (an ensemble) is calibrated on the same held-out scans."""
    from BrainAnomalyLib.core.manifest import read_manifest
    from BrainAnomalyLib.training.run import split_subjects

    out = data.root / "split-calibrated"
    code, _, stderr = run_calibrate(["--model", data.model, "--manifest", data.cal, "--cache-dir", data.cache,
                                     "--split", "calibration", "--allow-few-scans", "-o", out, "-q"])
    assert code == 0, stderr
    calib = json.loads((out / "model.json").read_text(encoding="utf-8"))["calibration"]
    expected = split_subjects([c for c in read_manifest(data.cal, "T1") if c.mask is None])["calibration"]
    assert calib["split"] == "calibration" and 0 < calib["n_scans"] == len(expected) < 8
    with pytest.raises(SystemExit):
        _parse(["--model", data.model, "--manifest", data.cal, "--split", "validation"])

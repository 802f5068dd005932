"""Several contrasts of one subject through a fusion model: the reference contrast registered once, the others on
its mask and transform, each scored by its member, the maps fused into one result; real SimpleITK I/O on synthetic
scans made from the template, the shipped tissue-t2 and tissue-flair models as members."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import PostprocessConfig
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.store.ensembles import build_fusion
from BrainAnomalyLib.store.models import load_model, resolve_model, save_model
from BrainAnomalyLib.synth.appearance import healthy_template_scan
from BrainAnomalyLib.training.run import base_meta

FAST = ["--no-register", "--skull-strip", "none", "--no-bias-correction", "--device", "cpu", "-q"]
CENTRE = (48, 60, 30)  # a lesion in the right hemisphere's white matter (z, y, x on the 2 mm grid)


def _write(array: np.ndarray, path, grid: Grid, shift_mm: float = 0.0):
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.CopyInformation(grid.reference())
    if shift_mm:
        img.SetOrigin([o + shift_mm for o in img.GetOrigin()])
    sitk.WriteImage(img, str(path))
    return str(path)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A T2 and a FLAIR scan of one synthetic subject on the template grid, with one bright lesion in both."""
    folder = tmp_path_factory.mktemp("session")
    grid = Grid()
    zz, yy, xx = np.indices(tuple(reversed(grid.size)))
    lesion = (zz - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 + (xx - CENTRE[2]) ** 2 <= 16
    paths = {}
    for modality in ("T2", "FLAIR"):
        image, mask = healthy_template_scan(modality, 3, grid)
        bright = np.percentile(image[mask], 99)
        image = np.where(lesion & mask, 1.5 * bright, image)
        paths[modality] = _write(image, folder / f"{modality.lower()}.nii.gz", grid)
    paths["far"] = _write(image, folder / "flair_far.nii.gz", grid, shift_mm=400.0)
    # a limited field of view: the last third of the FLAIR's rows empty, as a scanner that did not reach them gives
    cut = image.copy()
    cut[:, 2 * cut.shape[1] // 3:] = 0
    paths["cut"] = _write(cut, folder / "flair_cut.nii.gz", grid)
    paths["truth"] = _write(lesion & mask, folder / "truth.nii.gz", grid)
    return folder, paths, lesion


@pytest.fixture(scope="module")
def fusion_folder(tmp_path_factory):
    members = [("T2", resolve_model("tissue-t2")), ("FLAIR", resolve_model("tissue-flair"))]
    params = build_fusion(members, weights=[1.0, 3.0])
    # The synthetic scans lie in template space already: no registration, skull strip or N4 (fast)
    pre = PreprocessConfig(skull_strip="none", bias_correction=False, registration="none")
    meta = base_meta("fusion", "test-fusion", "T2", "T2 and FLAIR fused", Grid(), pre,
                     PostprocessConfig(median_size=1), params)
    meta["inputs"] = ["T2", "FLAIR"]
    return save_model(tmp_path_factory.mktemp("models") / "test-fusion", meta)


def test_fuse_is_the_weighted_mean_of_scan_scaled_maps_and_skips_a_missing_optional_member(fusion_folder):
    det = Detector.for_model(load_model(fusion_folder), device="cpu")
    a, b = np.full((2, 2, 2), 3.0, np.float32), np.full((2, 2, 2), 1.0, np.float32)
    stats = {"T2": {"median": 1.0, "mad": 2.0}, "FLAIR": {"median": 0.0, "mad": 0.5}}
    assert np.allclose(det.scorer.fuse({"T2": a, "FLAIR": b}, stats), (1.0 * 1.0 + 3.0 * 2.0) / 4.0)
    det.scorer.params["members"][0]["optional"] = True
    assert np.allclose(det.scorer.fuse({"FLAIR": b}, stats), 2.0)
    with pytest.raises(BadInputError, match="has no member for T1"):
        det.inputs({"T1": "x", "FLAIR": "y"})
    det.scorer.params["members"][0]["optional"] = False
    with pytest.raises(BadInputError, match="needs T2 too"):
        det.inputs({"FLAIR": "y"})


def test_cli_fuses_two_contrasts_into_one_result_on_the_reference_grid(session, fusion_folder, tmp_path, capsys):
    folder, paths, lesion = session
    out = tmp_path / "out"
    rc = main(["detect", f"FLAIR={paths['FLAIR']}", f"T2={paths['T2']}", "--model", str(fusion_folder),
               "--threshold", "4", *FAST, "-o", str(out)])
    assert rc == 0, capsys.readouterr()
    summary = json.loads((out / "result.json").read_text())
    assert summary["input"] == "FLAIR=flair.nii.gz T2=t2.nii.gz"
    assert summary["modality"] == "T2+FLAIR"
    assert {s.get("contrast_of") for s in summary["preprocessing"]} == {"T2", "FLAIR"}
    heat = sitk.ReadImage(str(out / "anomaly_map.nii.gz"))
    assert heat.GetSize() == sitk.ReadImage(paths["T2"]).GetSize()
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pred_mask.nii.gz"))) > 0
    assert pred[lesion].mean() > 0.5  # the lesion is found...
    assert pred.sum() < 3 * lesion.sum()  # ...and little else
    assert (out / "lesions.csv").is_file() and (out / "overlay.png").is_file()


@pytest.mark.parametrize("flair, said", [
    ("far", ["do not overlap in space"]),  # another session (or a wrong header): apart in space
    ("cut", ["has signal in only", "limited field of view"]),  # a FLAIR without signal over part of the brain
])
def test_a_companion_that_does_not_cover_the_reference_brain_is_refused_in_one_line(session, fusion_folder, tmp_path,
                                                                                     capsys, flair, said):
    _, paths, _ = session
    out = tmp_path / "out"
    rc = main(["detect", f"T2={paths['T2']}", f"FLAIR={paths[flair]}", "--model", str(fusion_folder),
               "--threshold", "4", *FAST, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and all(words in err[0] for words in said), err
    assert not out.exists() or not any(out.iterdir())


def test_one_volume_or_unnamed_inputs_are_refused_for_a_fusion_model(session, fusion_folder, tmp_path, capsys):
    _, paths, _ = session
    assert main(["detect", paths["T2"], "--model", str(fusion_folder), *FAST, "-o", str(tmp_path / "a")]) == 2
    assert "give each contrast as MODALITY=path" in capsys.readouterr().err
    assert main(["detect", paths["T2"], paths["FLAIR"], "--model", str(fusion_folder), *FAST,
                 "-o", str(tmp_path / "b")]) == 2
    assert "name each one's contrast" in capsys.readouterr().err
    assert main(["detect", f"T2={paths['T2']}", f"FLAIR={paths['FLAIR']}", "--model", "tissue-flair", *FAST,
                 "-o", str(tmp_path / "c")]) == 2
    assert "need a fusion model" in capsys.readouterr().err


def test_manifest_rows_of_one_subject_are_fused(session, fusion_folder, tmp_path, capsys):
    folder, paths, _ = session
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,modality,image,mask\n"
                        f"s1,T2,{paths['T2']},\ns1,FLAIR,{paths['FLAIR']},\ns1,T1,{paths['T2']},\n"
                        f"s2,FLAIR,{paths['FLAIR']},\n")
    rc = main(["detect", "--manifest", str(manifest), "--model", str(fusion_folder), "--threshold", "4", *FAST,
               "-o", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2  # s2 lacks its T2
    assert "skipped 1 of 4 rows: modality T1" in captured.out
    assert "s2: model test-fusion needs T2 too" in captured.err
    summary = json.loads((tmp_path / "out" / "s1" / "result.json").read_text())
    assert summary["modality"] == "T2+FLAIR"
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    # The row left out is listed too, as for a one-contrast model.
    assert rows[1].startswith("s1,T1,skipped")
    assert rows[2].startswith("s1,T2+FLAIR,ok") and rows[3].startswith("s2,FLAIR,failed")


def test_evaluate_scores_a_fusion_model_on_each_subjects_rows(session, fusion_folder, tmp_path, capsys):
    _, paths, _ = session
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,modality,image,mask\n"
                        f"s1,FLAIR,{paths['FLAIR']},{paths['truth']}\ns1,T2,{paths['T2']},{paths['truth']}\n")
    rc = main(["evaluate", "--manifest", str(manifest), "--model", str(fusion_folder), "--threshold", "4",
               "--device", "cpu", "-q", "-o", str(tmp_path / "report")])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["test-fusion"]
    assert metrics["n_lesion_scans"] == 1  # one case: the T2 row, with its FLAIR
    assert metrics["voxel"]["auprc"] > 0.5


def test_calibrate_takes_each_subjects_healthy_rows_as_one_session(fusion_folder, tmp_path, capsys):
    grid = Grid()
    rows = []
    for seed in (5, 6):
        for modality in ("T2", "FLAIR"):
            image, _ = healthy_template_scan(modality, seed, grid)
            rows.append(f"h{seed},{modality},{_write(image, tmp_path / f'{modality}{seed}.nii.gz', grid)},")
    manifest = tmp_path / "healthy.csv"
    manifest.write_text("subject,modality,image,mask\n" + "\n".join(rows) + "\n")
    out = tmp_path / "calibrated"
    rc = main(["calibrate", "--model", str(fusion_folder), "--manifest", str(manifest), "--allow-few-scans", "-q",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    calibration = load_model(out).meta["calibration"]
    assert calibration["n_scans"] == 2 and sorted(calibration["subjects"]) == ["h5", "h6"]
    t = calibration["thresholds"]
    assert 0 < t["0.05"] < t["0.01"] < t["0.001"]


def test_a_members_contralateral_weight_of_0_turns_its_own_off_and_none_keeps_it(tmp_path):
    """tissue-t2 subtracts half its mirror image on its own; a fusion that says 0 for it must get 0, and the
    fusion scripts (make_fusion_model.py, fusion_loo.py) write the 0 rather than leave it out."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_fusion_model.py"
    spec = importlib.util.spec_from_file_location("make_fusion_model", script)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    assert make.parse_member("T2=tissue-t2:0.5:0") == ("T2", "tissue-t2", 0.5, 0.0)
    assert make.parse_member("flair=tissue-flair") == ("FLAIR", "tissue-flair", 1.0, None)

    t2, flair = resolve_model("tissue-t2"), resolve_model("tissue-flair")
    assert t2.meta["postprocess"]["contralateral"] == 0.5 and flair.meta["postprocess"]["contralateral"] == 0.25
    params = build_fusion([("T2", t2), ("FLAIR", flair)], weights=[1.0, 1.0],
                          postprocess=[{"contralateral": 0.0}, None])
    meta = base_meta("fusion", "t2-off", "T2", "T2 and FLAIR fused", Grid(), PreprocessConfig(),
                     PostprocessConfig(median_size=1), params)
    meta["inputs"] = ["T2", "FLAIR"]
    det = Detector.for_model(load_model(save_model(tmp_path / "t2-off", meta)), device="cpu")
    assert det.members["T2"].postprocess_config.contralateral == 0.0
    assert det.members["FLAIR"].postprocess_config.contralateral == 0.25


def test_the_rms_rule_is_the_weighted_power_mean_of_the_positive_scan_scaled_parts(fusion_folder, tmp_path):
    t2, flair = resolve_model("tissue-t2"), resolve_model("tissue-flair")
    params = build_fusion([("T2", t2), ("FLAIR", flair)], weights=[1.0, 3.0], rule="rms", power=2.0)
    assert (params["rule"], params["power"]) == ("rms", 2.0)
    assert "rule" not in build_fusion([("T2", t2), ("FLAIR", flair)])  # a mean fusion's params as before
    with pytest.raises(ValueError, match="rule"):
        build_fusion([("T2", t2), ("FLAIR", flair)], rule="max")
    meta = dict(load_model(fusion_folder).meta, params=params)
    det = Detector.for_model(load_model(save_model(tmp_path / "rms", meta)), device="cpu")
    a = np.array([3.0, -1.0, 1.0], np.float32).reshape(3, 1, 1)
    b = np.array([1.0, 2.0, -1.0], np.float32).reshape(3, 1, 1)
    stats = {"T2": {"median": 1.0, "mad": 2.0}, "FLAIR": {"median": 0.0, "mad": 0.5}}
    # z: T2 (1, -1, 0), FLAIR (2, 4, -2); the negative parts count as 0
    expected = np.sqrt((np.array([1.0, 0.0, 0.0]) ** 2 + 3.0 * np.array([2.0, 4.0, 0.0]) ** 2) / 4.0)
    assert np.allclose(det.scorer.fuse({"T2": a, "FLAIR": b}, stats).ravel(), expected)
    mean = Detector.for_model(load_model(fusion_folder), device="cpu").scorer.fuse({"T2": a, "FLAIR": b}, stats)
    assert np.allclose(mean.ravel(), (np.array([1.0, -1.0, 0.0]) + 3.0 * np.array([2.0, 4.0, -2.0])) / 4.0)


def test_a_thick_slice_member_is_scored_as_thick_and_erodes_the_fused_region_across_its_slices(session,
                                                                                                fusion_folder):
    """A FLAIR of 8 mm slices beside a 2 mm T2: grid_volumes says how far each contrast's voxels reach, the FLAIR
    member scores with its priors widened across the slices (as it would alone), and the fused map's region loses
    three 2 mm slices at the brain's top and bottom; a 2 mm FLAIR changes neither."""
    from BrainAnomalyLib.core.progress import Reporter

    _, paths, _ = session
    det = Detector.for_model(load_model(fusion_folder), device="cpu")
    flair = sitk.ReadImage(paths["FLAIR"], sitk.sitkFloat32)
    blurred = sitk.SmoothingRecursiveGaussian(flair, [1e-3, 1e-3, 8.0 / 2.3548])
    size = list(flair.GetSize())
    ref = sitk.Image([size[0], size[1], size[2] // 4], sitk.sitkFloat32)
    ref.SetSpacing([2.0, 2.0, 8.0])
    ref.SetOrigin(flair.GetOrigin())
    ref.SetDirection(flair.GetDirection())
    thick = sitk.Resample(blurred, ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    scans = {"T2": sitk.ReadImage(paths["T2"], sitk.sitkFloat32), "FLAIR": thick}
    pre, images, acquisition = det.grid_volumes(scans, Reporter())
    np.testing.assert_allclose(acquisition["T2"], [2, 2, 2], atol=1e-3)
    np.testing.assert_allclose(acquisition["FLAIR"], [8, 2, 2], atol=1e-3)
    as_thin = det.score_grid(images, pre.mask, acquisition_mm={"T2": [2, 2, 2], "FLAIR": [2, 2, 2]})
    as_thick = det.score_grid(images, pre.mask, acquisition_mm=acquisition)
    assert not np.array_equal(as_thin.raw_map, as_thick.raw_map)  # the FLAIR member's priors widened
    thin_slices = np.flatnonzero(as_thin.scoring_mask.any(axis=(1, 2)))
    thick_slices = np.flatnonzero(as_thick.scoring_mask.any(axis=(1, 2)))
    assert thick_slices.min() >= thin_slices.min() + 3 and thick_slices.max() <= thin_slices.max() - 3
    np.testing.assert_array_equal(det.score_grid(images, pre.mask).scoring_mask, as_thin.scoring_mask)

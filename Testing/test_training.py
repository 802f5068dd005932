"""Training from a manifest: healthy-only, subject split, calibration, a loadable model folder."""

import json

import numpy as np

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.manifest import Case, read_manifest, write_manifest
from BrainAnomalyLib.store.models import load_model
from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.training.run import split_subjects

from conftest import write_template_cases


def _cohort(folder, n=8):
    cases = write_template_cases(folder, n, seed=5)
    cases.append(Case("p1", "T1", folder / "h0.nii.gz", folder / "h0.nii.gz"))  # a lesion row: not trained on
    write_manifest(folder / "cohort.csv", cases)
    return folder / "cohort.csv"


def test_manifest_paths_are_relative_to_the_csv(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.csv").write_text("subject,modality,image,mask\n"
                                            "a,t1,img/a.nii.gz,\nb,FLAIR,b.nii,b_seg.nii\n")
    rows = read_manifest(tmp_path / "sub" / "m.csv")
    assert rows[0].image == (tmp_path / "sub" / "img" / "a.nii.gz").resolve() and rows[0].mask is None
    assert rows[0].modality == "T1" and rows[1].mask.name == "b_seg.nii"
    assert [r.subject for r in read_manifest(tmp_path / "sub" / "m.csv", "flair")] == ["b"]


def test_split_is_by_subject_and_stable():
    cases = [Case(f"s{i}", m, None, None) for i in range(40) for m in ("T1", "T2")]
    a, b = split_subjects(cases), split_subjects(list(reversed(cases)))
    assert {k: {c.subject for c in v} for k, v in a.items()} == {k: {c.subject for c in v} for k, v in b.items()}
    subjects = [{c.subject for c in a[k]} for k in ("train", "calibration", "test")]
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2]) and not (subjects[1] & subjects[2])
    assert len(subjects[0]) == 28 and len(subjects[1]) == 6 and len(subjects[2]) == 6


def test_train_normative_from_a_manifest(tmp_path, capsys):
    csv = _cohort(tmp_path)
    out = tmp_path / "model"
    code = main(["train", "--model", "normative", "--manifest", str(csv), "--modality", "T1", "-o", str(out),
                 "--skull-strip", "none", "--no-bias-correction", "--no-register",
                 "--cache-dir", str(tmp_path / "cache"), "--allow-few-scans", "-q"])
    assert code == 0, capsys.readouterr().err
    model = load_model(out)
    meta = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert meta["kind"] == "normative" and meta["params"]["direction"] == "hypo"
    assert meta["training_data"]["lesion_rows_ignored"] == 1
    assert meta["training_data"]["n_train"] + meta["training_data"]["n_calibration"] \
        + meta["training_data"]["n_test_held_out"] == 8
    thr = meta["calibration"]["thresholds"]
    assert thr["0.001"] > thr["0.01"] > thr["0.05"] > 0
    assert model.tensors["mean"].shape == tuple(reversed(Grid().size))
    assert len(list((tmp_path / "cache").glob("*.npz"))) >= 6  # preprocessed once, reused by calibration
    # The dense calibration curve is stored beside the table, and holds the table's points.
    curve = meta["calibration"]["curve"]
    assert curve["fpr"][0] == 1e-4 and curve["fpr"][-1] == 0.5 and len(curve["fpr"]) == len(curve["threshold"])
    assert np.all(np.diff(curve["fpr"]) > 0) and np.all(np.diff(curve["threshold"]) <= 0)
    assert all(dict(zip(curve["fpr"], curve["threshold"]))[float(k)] == v for k, v in thr.items())
    assert "whole grid brain mask" in meta["calibration"]["method"]


def test_cache_reads_dicom_folders_and_reports_missing_files(tmp_path):
    import pytest

    from BrainAnomalyLib.store.cache import cache_key
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig

    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"one")
    key = cache_key(folder, PreprocessConfig(), Grid())
    (folder / "a.dcm").write_bytes(b"two")
    assert cache_key(folder, PreprocessConfig(), Grid()) != key  # content, not name, decides
    with pytest.raises(BadInputError, match="not found"):
        cache_key(tmp_path / "missing.nii.gz", PreprocessConfig(), Grid())


def test_train_with_histogram_standardisation_stores_its_reference(tmp_path):
    from BrainAnomalyLib.preprocess.normalise import LANDMARKS

    csv = _cohort(tmp_path, n=6)
    out = tmp_path / "hist-model"
    assert main(["train", "--model", "normative", "--manifest", str(csv), "-o", str(out), "--normalisation",
                 "histogram", "--skull-strip", "none", "--no-bias-correction", "--no-register",
                 "--cache-dir", str(tmp_path / "cache"), "--allow-few-scans", "-q"]) == 0
    pre = json.loads((out / "model.json").read_text(encoding="utf-8"))["preprocessing"]
    assert pre["normalisation"] == "histogram"
    ref = pre["normalisation_reference"]
    assert len(ref) == len(LANDMARKS) and ref[0] == 0.0 and ref[-1] == 100.0 and ref == sorted(ref)

"""DICOM in and out (core/dicom.py): the series a folder is read as and the note saying which, and the findings
and anomaly map exported as a DICOM SEG and a Parametric Map on an oblique, anisotropic series, read back with
highdicom/pydicom voxel for voxel on the source grid, and checked by the dciodvfy IOD validator."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import highdicom as hd
from BrainAnomalyLib.core.dicom import MAP_NAME, SEG_NAME, export_dicom, find_series, read_series
from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.core.io import read_volume
from BrainAnomalyLib.detection.postprocess import label_lesions, number_findings
from dicom_series import findings_on, oblique_volume, write_series


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """An oblique, anisotropic MR series (files shuffled against slice order) and the volume it holds."""
    folder = tmp_path_factory.mktemp("dicom") / "t1"
    volume = oblique_volume()
    write_series(volume, folder)
    return folder, volume


def _frames_by_source(dataset):
    """(referenced source SOP instance UID, its frame's image position) of each frame."""
    out = []
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out.append((ref, np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])))
    return out


def test_several_series_are_read_as_the_largest_and_the_note_says_which(series, tmp_path):
    folder, volume = series
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    localizer = oblique_volume(size=(64, 72, 3), spacing=(1.1, 0.9, 30.0), seed=1)
    write_series(localizer, mixed, number=1, description="localizer")
    notes = []
    image = read_volume(mixed, notes=notes)
    assert image.GetSize() == volume.GetSize()
    assert np.allclose(image.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    assert np.allclose(image.GetDirection(), volume.GetDirection(), atol=1e-6)
    assert np.allclose(image.GetSpacing(), volume.GetSpacing(), atol=1e-4)
    assert len(notes) == 1
    assert "holds 2 DICOM series" in notes[0] and "series 3 'T1 oblique' (18 images" in notes[0]
    assert "series 1 'localizer' (3 images" in notes[0]
    # One series: no note.
    notes = []
    read_volume(folder, notes=notes)
    assert notes == []
    assert find_series(folder)[1] is None and read_series(folder)[1] is None


def test_number_findings_matches_label_lesions(series):
    scan = read_volume(series[0])
    heat, numbered, lesions = findings_on(scan)
    binary, same = label_lesions(heat, 1.0, 0.0)
    assert same == lesions
    again = number_findings(binary, lesions)
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(numbered))
    with pytest.raises(ValueError, match="lesion table"):
        number_findings(binary, lesions[:2])


@pytest.mark.parametrize("per_finding", [True, False])
def test_seg_and_parametric_map_land_on_the_source_grid(series, tmp_path, per_finding):
    folder, _ = series
    scan = read_volume(folder)
    heat, numbered, lesions = findings_on(scan)
    out = tmp_path / "out"
    out.mkdir()
    paths = export_dicom(numbered, lesions, heat, folder, out, per_finding, "test-model", [1.0, 5.0])
    assert [p.name for p in paths] == [SEG_NAME, MAP_NAME] and all(p.is_file() for p in paths)

    source_series = find_series(folder)[0]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_series.files]  # in slice order
    uids = [ds.SOPInstanceUID for ds in sources]
    expected = sitk.GetArrayFromImage(numbered)
    if not per_finding:
        expected = (expected > 0).astype(np.uint8)

    seg = hd.seg.segread(paths[0])
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == (["Lesion 1", "Lesion 2", "Lesion 3"] if per_finding else ["Anomaly"])
    # Voxel for voxel through the references: each source image's frame holds that slice's findings.
    got = seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False)
    assert np.array_equal(got, expected)
    # And through the frames' own geometry: each frame lies where the image it references lies.
    positions = {ds.SOPInstanceUID: np.array([float(v) for v in ds.ImagePositionPatient]) for ds in sources}
    frames = _frames_by_source(seg)
    assert len(frames) == len({k for k in np.flatnonzero(expected.reshape(len(uids), -1).any(axis=1))})
    for ref, position in frames:
        assert np.allclose(position, positions[ref], atol=1e-4)
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [0.9, 1.1], atol=1e-6)
    assert np.allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                       [float(v) for v in sources[0].ImageOrientationPatient], atol=1e-6)

    pm = pydicom.dcmread(paths[1])
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    values = pm.pixel_array
    heat_arr = sitk.GetArrayFromImage(heat)
    for i, (ref, position) in enumerate(_frames_by_source(pm)):
        k = uids.index(ref)
        assert np.allclose(position, positions[ref], atol=1e-4)
        assert np.array_equal(values[i], heat_arr[k])
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "ANOMALY"


def test_no_findings_give_one_empty_anomaly_segment(series, tmp_path):
    folder, _ = series
    scan = read_volume(folder)
    heat, numbered, _ = findings_on(scan)
    empty = sitk.Image(numbered.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(numbered)
    paths = export_dicom(empty, [], heat, folder, tmp_path, True)
    seg = hd.seg.segread(paths[0])
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["Anomaly"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in find_series(folder)[0].files]
    assert not seg.get_pixels_by_source_instance(uids, combine_segments=True).any()


def test_results_off_the_series_grid_are_refused(series, tmp_path):
    folder, _ = series
    scan = read_volume(folder)
    heat, numbered, lesions = findings_on(scan)
    moved = sitk.Image(numbered)
    moved.SetOrigin([v + 0.5 for v in numbered.GetOrigin()])
    with pytest.raises(BadInputError, match="not on the grid of DICOM series .* lies elsewhere"):
        export_dicom(moved, lesions, heat, folder, tmp_path)
    cropped = numbered[:, :, :-1]
    with pytest.raises(BadInputError, match="17 slices against the series' 18 images"):
        export_dicom(cropped, lesions, heat, folder, tmp_path)
    assert not list(tmp_path.iterdir())
    with pytest.raises(BadInputError, match="no DICOM series"):
        export_dicom(numbered, lesions, heat, tmp_path, tmp_path)


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed; see README, Development")
def test_exported_files_pass_the_dciodvfy_validator(series, tmp_path):
    folder, _ = series
    scan = read_volume(folder)
    heat, numbered, lesions = findings_on(scan)
    paths = export_dicom(numbered, lesions, heat, folder, tmp_path, True, "test-model", [1.0, 5.0])
    source = find_series(folder)[0].files[0]
    for path, iod in ((paths[0], "Segmentation"), (paths[1], "ParametricMap"), (source, "MRImage")):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        assert report.splitlines()[0].strip() == iod, report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, report


def test_detect_dicom_out_writes_the_findings_of_the_label_map(tmp_path, coarse_demo_case, intensity_model,
                                                               capsys):
    """The CLI end to end on the oblique demo scan (its coarse, anisotropic version: a tenth of the voxels and
    under half the images to write, read and export) as a DICOM series, beside a localizer series."""
    import json

    from BrainAnomalyLib.cli.main import main

    source = tmp_path / "session"
    scan = coarse_demo_case[0]
    write_series(scan, source, number=5, description="T1 demo")
    write_series(oblique_volume(size=(64, 72, 3), spacing=(1.1, 0.9, 30.0), seed=1), source, number=1,
                 description="localizer")
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    # Registration and skull stripping off: the test is about the grids and files, not the detection.
    code = main(["detect", str(source), "--model", str(intensity_model.path), "--no-bias-correction",
                 "--no-register", "--skull-strip", "none", "-o", str(out), "--dicom-out", str(dicom), "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    assert scan.GetSize()[2] == 63
    assert "note: folder" in printed and "holds 2 DICOM series; read series 5 'T1 demo' (63 images" in printed
    summary = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert any("holds 2 DICOM series" in n for n in summary["notes"])
    assert summary["n_lesions"] >= 1
    assert sorted(p.name for p in dicom.iterdir()) == sorted([SEG_NAME, MAP_NAME])
    pred = sitk.ReadImage(str(out / "pred_mask.nii.gz"))
    numbered = sitk.GetArrayFromImage(number_findings(pred, summary["lesions"]))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in find_series(source)[0].files]
    seg = hd.seg.segread(dicom / SEG_NAME)
    assert len(seg.SegmentSequence) == summary["n_lesions"]
    assert np.array_equal(seg.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False), numbered)


def test_dicom_out_needs_a_dicom_series_and_writes_nothing_without_one(tmp_path, intensity_model, capsys):
    from BrainAnomalyLib.cli.main import main

    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(oblique_volume(), str(scan))
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    code = main(["detect", str(scan), "--model", str(intensity_model.path), "-o", str(out), "--dicom-out",
                 str(dicom), "-q"])
    assert code == 2
    assert "--dicom-out needs the scan as a DICOM series folder" in capsys.readouterr().err
    assert not out.exists() and not dicom.exists()
    code = main(["detect", str(scan), "--model", str(intensity_model.path), "-o", str(out), "--dicom-out",
                 str(out / "dicom"), "-q"])
    assert code == 2 and "apart from -o" in capsys.readouterr().err


def test_manifest_dicom_out_writes_one_folder_per_case(tmp_path, coarse_demo_case, intensity_model, capsys):
    from BrainAnomalyLib.cli.main import main

    write_series(coarse_demo_case[0], tmp_path / "s1")
    sitk.WriteImage(coarse_demo_case[0], str(tmp_path / "s2.nii.gz"))
    (tmp_path / "cohort.csv").write_text("subject,modality,image,mask\ns1,T1,s1,\ns2,T1,s2.nii.gz,\n",
                                         encoding="utf-8")
    out, dicom = tmp_path / "out", tmp_path / "dicom"
    code = main(["detect", "--manifest", str(tmp_path / "cohort.csv"), "--model", str(intensity_model.path),
                 "--no-bias-correction", "--no-register", "--skull-strip", "none", "-o", str(out),
                 "--dicom-out", str(dicom), "-q"])
    assert code == 2  # the NIfTI case cannot be exported, and says so; the other goes on
    assert sorted(p.name for p in (dicom / "s1_T1").iterdir()) == sorted([SEG_NAME, MAP_NAME])
    assert not (dicom / "s2_T1").exists() and not (out / "s2_T1").exists()
    assert "--dicom-out needs the scan as a DICOM series folder" in capsys.readouterr().err


def test_dicom_source_of_a_fusion_is_its_reference_contrast(tmp_path):
    from BrainAnomalyLib.cli.cohort import dicom_source
    from BrainAnomalyLib.detection.request import DetectionRequest

    (tmp_path / "t1").mkdir()
    request = DetectionRequest(inputs={"FLAIR": str(tmp_path / "flair.nii.gz"), "T1": str(tmp_path / "t1")})
    assert dicom_source(request) == tmp_path / "t1"
    with pytest.raises(BadInputError, match="flair.nii.gz is not a folder"):
        dicom_source(DetectionRequest(inputs={"FLAIR": str(tmp_path / "flair.nii.gz"), "T2": str(tmp_path)}))

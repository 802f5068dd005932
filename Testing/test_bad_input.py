"""Every kind of bad input gives one clear message (BadInputError, exit 2) and writes nothing."""

import locale

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.core.io import read_volume
from BrainAnomalyLib.preprocess.skullstrip import brain_mask
from BrainAnomalyLib.core.progress import Reporter


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


def _volume(shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0), value=None):
    arr = np.random.default_rng(0).normal(100, 10, shape[::-1]).astype(np.float32) if value is None else \
        np.full(shape[::-1], value, np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")


def test_unreadable_file(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"this is not an image" * 10)
    with pytest.raises(BadInputError, match="cannot read"):
        read_volume(p)


def test_2d_image(tmp_path):
    p = _write(sitk.GetImageFromArray(np.random.rand(64, 64).astype(np.float32)), tmp_path / "flat.nrrd")
    with pytest.raises(BadInputError, match="2D"):
        read_volume(p)


def test_single_slice_3d_counts_as_2d(tmp_path):
    p = _write(_volume((64, 64, 1), (1, 1, 1)), tmp_path / "slice.nii.gz")
    with pytest.raises(BadInputError, match="only 1 slice"):
        read_volume(p)


def test_4d_with_several_volumes(tmp_path):
    vols = [_volume() for _ in range(3)]
    p = _write(sitk.JoinSeries(vols), tmp_path / "fmri.nii.gz")
    with pytest.raises(BadInputError, match="4D with 3 volumes"):
        read_volume(p)


def test_4d_with_one_volume_is_accepted(tmp_path):
    p = _write(sitk.JoinSeries([_volume()]), tmp_path / "one.nii.gz")
    img = read_volume(p)
    assert img.GetDimension() == 3 and img.GetSize() == (64, 64, 64)


def test_rgb_pixels(tmp_path):
    rgb = sitk.Image([64, 64, 64], sitk.sitkVectorUInt8, 3)
    rgb.SetSpacing([2, 2, 2])
    with pytest.raises(BadInputError, match="components per voxel"):
        read_volume(_write(rgb, tmp_path / "rgb.nrrd"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(tmp_path, bad):
    img = _volume()
    arr = sitk.GetArrayFromImage(img)
    arr[10, 10, 10] = bad
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    with pytest.raises(BadInputError, match="NaN or infinite"):
        read_volume(_write(out, tmp_path / "nan.nrrd"))


def test_constant_image(tmp_path):
    with pytest.raises(BadInputError, match="constant"):
        read_volume(_write(_volume(value=7.0), tmp_path / "const.nii.gz"))


def test_too_small(tmp_path):
    with pytest.raises(BadInputError, match="too small"):
        read_volume(_write(_volume((64, 64, 4), (1, 1, 1)), tmp_path / "small.nii.gz"))


def test_too_large(tmp_path):
    with pytest.raises(BadInputError, match="too large"):
        read_volume(_write(_volume((20, 20, 20), (60, 60, 60)), tmp_path / "huge.nii.gz"))


def test_empty_brain_after_stripping():
    arr = np.zeros((100, 100, 100), np.float32)
    arr[40:45, 40:45, 40:45] = 100.0  # a tiny object on a zero background: "stripped", but no brain
    img = sitk.GetImageFromArray(arr)
    with pytest.raises(BadInputError, match="brain mask .* empty or too small"):
        brain_mask(img, "auto", False, Reporter())


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    vol = sitk.Cast(_volume((48, 40, 36), (1.5, 1.5, 2.5)), sitk.sitkInt16)
    vol.SetOrigin((-30.0, 12.0, 5.0))
    folder = tmp_path / "dicom"
    folder.mkdir()
    saved_locale = locale.setlocale(locale.LC_ALL)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    common = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
              "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0037": "1\\0\\0\\0\\1\\0",
              "0028|0030": "1.5\\1.5", "0018|0050": "2.5"}
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    # GDCM's writer leaves the process in the "C" locale (Python's default text encoding then becomes ASCII for
    # the rest of the test session); the library writes DICOM only through pydicom, so restore it here.
    locale.setlocale(locale.LC_ALL, saved_locale)
    img = read_volume(folder)
    assert img.GetSize() == (48, 40, 36)
    assert np.allclose(img.GetSpacing(), (1.5, 1.5, 2.5), atol=1e-3)
    assert np.allclose(img.GetOrigin(), (-30.0, 12.0, 5.0), atol=1e-3)


def test_folder_without_dicom(tmp_path):
    with pytest.raises(BadInputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, intensity_model):
    p = _write(_volume(value=3.0), tmp_path / "const.nii.gz")
    out = tmp_path / "out"
    code = main(["detect", str(p), "--model", str(intensity_model.path), "-o", str(out), "-q"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "constant" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_cli_missing_input_exits_2(tmp_path, capsys, intensity_model):
    code = main(["detect", str(tmp_path / "missing.nii.gz"), "--model", str(intensity_model.path),
                 "-o", str(tmp_path / "o"), "-q"])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_cli_modality_mismatch_exits_2(tmp_path, capsys, intensity_model):
    p = _write(_volume(), tmp_path / "scan.nii.gz")
    code = main(["detect", str(p), "--model", str(intensity_model.path), "--modality", "FLAIR",
                 "-o", str(tmp_path / "o"), "-q"])
    assert code == 2
    assert "for T1 scans but the input is FLAIR" in capsys.readouterr().err

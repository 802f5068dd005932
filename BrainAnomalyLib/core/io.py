"""Reading and writing volumes with SimpleITK, with the checks that turn bad input into one clear message."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from .dicom import read_series
from .errors import BadInputError
from .files import atomic_path

# A brain scan covers at least a few centimetres in every direction and at most a whole body's worth of voxels.
MIN_EXTENT_MM = 60.0
MIN_VOXELS_PER_AXIS = 8
MAX_VOXELS = 400_000_000
MAX_EXTENT_MM = 1000.0


NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")
_INTEGER_PIXELS = {sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
                   sitk.sitkInt64, sitk.sitkUInt64}


def read_volume(path: str | os.PathLike, fill_nan: bool = False, notes: Optional[List[str]] = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA/... file or a DICOM series folder as a validated 3D float32 image.

    NaN or infinite voxels are refused unless `fill_nan`, which sets them to the lowest finite value (background).
    A folder of several DICOM series is read as the one core.dicom.find_series picks; which one is appended to
    `notes` (the result's notes, which every front end shows).
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"input not found: {p}")
    try:
        if p.is_dir():
            image, note = read_series(p)
            if note and notes is not None:
                notes.append(note)
        else:
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise BadInputError(f"cannot read {p}: {itk_reason(exc)}") from None
    if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
        image = _restore_nifti_nonfinite(image, p)
    return validate_volume(image, name=p.name, fill_nan=fill_nan)


# ITK's own wording for common reading failures, and what it means to a user.
_ITK_REASONS = (("Unable to determine ImageIO reader", "not an image format that can be read, or a damaged file"),
                ("Could not create IO object", "not an image format that can be read, or a damaged file"),
                ("does not exist", "no such file"),
                ("ImageIO returns IO region that does not fully contain", "the file is shorter than its header says "
                                                                          "(truncated)"))


def itk_reason(exc: Exception) -> str:
    """A SimpleITK error as one plain line: a known failure in plain words, else ITK's last line without its
    source-file and class prefixes."""
    text = str(exc).strip()
    for marker, plain in _ITK_REASONS:
        if marker in text:
            return plain
    last = text.splitlines()[-1] if text else "unknown reason"
    return re.sub(r"^(\S*itk::)?(ERROR|Error|Exception)\S*:\s*(\S+?\s?\(0x[0-9a-f]+\):\s*)?", "", last).strip() \
        or "unknown reason"


def _dims(values) -> str:
    """Sizes or extents as 64 x 64 x 1 (plain numbers, never numpy reprs)."""
    return " x ".join(f"{float(v):g}" for v in values)


def _restore_nifti_nonfinite(image: sitk.Image, path: Path) -> sitk.Image:
    """ITK's NIfTI reader silently turns NaN and infinite voxels into 0, which would pass them off as background;
    read the stored values with nibabel and put them back so validation sees them."""
    if image.GetPixelID() in _INTEGER_PIXELS:
        # ITK reads scaled voxels (scl_slope, scl_inter) as float, so integer pixels are the stored integers, which
        # cannot be NaN: no second reading (importing nibabel and decompressing the file again cost a BraTS T1
        # 0.2 s of detect's start).
        return image
    import nibabel
    import nibabel.filebasedimages

    try:
        data = nibabel.load(str(path)).dataobj
        if not np.issubdtype(np.dtype(data.dtype), np.floating) and data.slope == 1 and data.inter == 0:
            return image  # integer voxels cannot hold NaN
        stored = np.asanyarray(data)
    except (nibabel.filebasedimages.ImageFileError, OSError, ValueError, EOFError):
        return image  # nibabel cannot parse what ITK could: leave ITK's reading as it is
    if stored.ndim == 4 and stored.shape[3] == 1:
        stored = stored[..., 0]
    if stored.ndim != image.GetDimension() or np.isfinite(stored).all():
        return image
    arr = sitk.GetArrayFromImage(image)
    bad = ~np.isfinite(stored.T)  # nibabel indexes i,j,k; SimpleITK's arrays are k,j,i
    if bad.shape != arr.shape:
        return image
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    arr[bad] = stored.T[bad]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def validate_volume(image: sitk.Image, name: str = "input", fill_nan: bool = False) -> sitk.Image:
    """Return the image as 3D float32 or raise BadInputError saying what is wrong with it; with `fill_nan`, NaN
    and infinite voxels are set to the lowest finite value instead of refused."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise BadInputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                            "(RGB or vector image); a scalar MRI volume is needed")
    dim = image.GetDimension()
    if dim == 4:
        if image.GetSize()[3] != 1:
            raise BadInputError(f"{name}: is 4D with {image.GetSize()[3]} volumes; extract one volume first")
        image = image[:, :, :, 0]
        dim = 3
    if dim == 2:
        raise BadInputError(f"{name}: is a single 2D image ({_dims(image.GetSize())} pixels), not a 3D scan")
    if dim != 3:
        raise BadInputError(f"{name}: has {dim} dimensions; a 3D scan is needed")
    if min(image.GetSize()) <= 1:
        raise BadInputError(f"{name}: has only 1 slice ({_dims(image.GetSize())} voxels), not a 3D scan")
    size = np.array(image.GetSize())
    extent = size * np.array(image.GetSpacing())
    if size.min() < MIN_VOXELS_PER_AXIS or extent.min() < MIN_EXTENT_MM:
        raise BadInputError(f"{name}: is too small to be a brain scan ({_dims(size)} voxels, "
                            f"{_dims(np.round(extent, 1))} mm)")
    if size.prod() > MAX_VOXELS or extent.max() > MAX_EXTENT_MM:
        raise BadInputError(f"{name}: is too large for a brain scan ({_dims(size)} voxels, "
                            f"{_dims(np.round(extent, 1))} mm)")
    image = sitk.Cast(image, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(arr)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == finite.size:
        raise BadInputError(f"{name}: every voxel is NaN or infinite")
    if n_bad:
        if not fill_nan:
            raise BadInputError(f"{name}: contains NaN or infinite values in {n_bad} of {finite.size} voxels; "
                                "fix the file, or fill them with the lowest finite value (--fill-nan)")
        filled = sitk.GetArrayFromImage(image)
        filled[~finite] = filled[finite].min()
        out = sitk.GetImageFromArray(filled)
        out.CopyInformation(image)
        image = out
        arr = sitk.GetArrayViewFromImage(image)
    if float(arr.max()) == float(arr.min()):
        raise BadInputError(f"{name}: is constant (every voxel is {float(arr.min()):g})")
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def write_volume(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write through a temporary file in the same folder so a crash never leaves a half-written volume."""
    path = Path(path)
    with atomic_path(path, "".join(path.suffixes) or ".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)

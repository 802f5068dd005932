"""Affine registration of a skull-stripped scan to the template brain in torch (`registration: torch`).

The same job as preprocess.register (template points -> scan points, the template brain mask restricting the
metric), done the way a GPU does it fast: every template-brain voxel sampled at once by grid_sample, a
three-level pyramid (average pooling), Adam on the squared normalised cross-correlation (squared, so a contrast
whose brain is darker where the T1 template is bright aligns as well), started from the centres of mass. It does
not try the 24 right-angle starts of the SimpleITK method: a scan lying 90 degrees off its header is left to
`registration: affine`. How close it comes to SimpleITK's result: scripts/compare_registration.py (README: two
of the five brats18_dev T1 scans below the issue's brain-mask Dice of 0.98, so it is not the default anywhere).
"""

from __future__ import annotations

import time
import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import BadInputError
from .torch_grid import image_matrix

# (pooling factor of the scan, of the template grid, Adam steps): coarse to fine.
LEVELS = ((4, 2, 120), (2, 1, 60), (1, 1, 30))
LEARNING_RATE = 0.01
# Parameters are scaled so that one unit moves a point at this distance from the centre by about a millimetre
# per 0.01: the matrix entries and the translation (in units of this radius) then act alike under Adam.
RADIUS_MM = 50.0
# Below this correlation at the end no brain alignment was found (aligned brats18_dev and IXI T1 scans end at
# 0.80-0.85).
MIN_NCC = 0.3


def _pooled(volume: torch.Tensor, matrix: np.ndarray, factor: int) -> tuple[torch.Tensor, np.ndarray]:
    """Average-pooled volume and its index -> physical matrix (pooled voxel i covers source voxels f*i..f*i+f-1)."""
    if factor == 1:
        return volume, matrix
    pooled = F.avg_pool3d(volume[None, None], factor, stride=factor, ceil_mode=True)[0, 0]
    shift = np.eye(4)
    shift[:3, :3] *= factor
    shift[:3, 3] = (factor - 1) / 2.0
    return pooled, matrix @ shift


def _points(matrix: np.ndarray, where: torch.Tensor) -> torch.Tensor:
    """Physical points (n, 3) of the voxels `where` of a (k, j, i) volume."""
    kji = torch.nonzero(where).to(torch.float32)
    ijk1 = torch.cat([kji.flip(1), torch.ones(len(kji), 1, device=where.device)], dim=1)
    return (ijk1 @ torch.as_tensor(matrix.T, dtype=torch.float32, device=where.device))[:, :3]


def _sampler(volume: torch.Tensor, matrix: np.ndarray):
    """Trilinear sampling of `volume` at physical points (n, 3); border values beyond the edge."""
    to_index = torch.as_tensor(np.linalg.inv(matrix), dtype=torch.float32, device=volume.device)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in reversed(volume.shape)], device=volume.device)
    src = volume[None, None]

    def sample(points: torch.Tensor) -> torch.Tensor:
        ijk = points @ to_index[:3, :3].T + to_index[:3, 3]
        grid = (ijk * scale - 1.0).view(1, -1, 1, 1, 3)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True).view(-1)
    return sample


def _ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + 1e-12)


def _centre_of_mass(volume: torch.Tensor, matrix: np.ndarray) -> np.ndarray:
    where = volume > 0
    points = _points(matrix, where)
    w = volume[where].to(torch.float64)
    return (points.to(torch.float64) * w[:, None]).sum(0).cpu().numpy() / max(float(w.sum()), 1e-12)


def register_affine_torch(moving, moving_mask: np.ndarray, fixed, fixed_mask: np.ndarray,
                          device: str = "cpu") -> tuple[np.ndarray, dict]:
    """Return (4x4 template -> scan physical affine, info) for SimpleITK images `moving` (the stripped scan) and
    `fixed` (the template on the model grid) with their brain masks (numpy, (k, j, i)).

    Raises BadInputError when no alignment with the template brain is found."""
    import SimpleITK as sitk

    def on(array, dtype=torch.float32):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=device)

    return register_arrays(on(sitk.GetArrayFromImage(moving)), image_matrix(moving), on(moving_mask, torch.bool),
                           on(sitk.GetArrayFromImage(fixed)), image_matrix(fixed), on(fixed_mask, torch.bool))


def register_arrays(moving: torch.Tensor, m_matrix: np.ndarray, moving_mask: torch.Tensor, fixed: torch.Tensor,
                    f_matrix: np.ndarray, fixed_mask: torch.Tensor) -> tuple[np.ndarray, dict]:
    """register_affine_torch on tensors (k, j, i) and their index -> physical matrices, on their device (no
    SimpleITK needed: scripts/gpu_detect_benchmark.py runs this where there is none)."""
    started = time.perf_counter()
    device = moving.device
    if not bool(moving_mask.any()):
        raise BadInputError("registration to the template brain failed: the brain mask is empty")
    m = moving.to(torch.float32)
    m = torch.where(moving_mask, m, m[moving_mask].min())
    m = m - m.min()
    f = fixed.to(torch.float32)
    f = torch.where(fixed_mask, f, f[fixed_mask].min())
    f = f - f.min()
    # The metric region: the template brain grown by two voxels, so the brain's edge itself is matched.
    region = F.max_pool3d(fixed_mask.to(torch.float32)[None, None], 5, 1, 2)[0, 0]

    centre = _centre_of_mass(f, f_matrix)
    start = _centre_of_mass(m, m_matrix) - centre
    d_matrix = torch.zeros(3, 3, device=device, requires_grad=True)
    d_shift = torch.zeros(3, device=device, requires_grad=True)
    c = torch.as_tensor(centre, dtype=torch.float32, device=device)
    t0 = torch.as_tensor(start, dtype=torch.float32, device=device)
    eye = torch.eye(3, device=device)
    history = []
    for m_factor, f_factor, steps in LEVELS:
        mv, mv_matrix = _pooled(m, m_matrix, m_factor)
        fv, fv_matrix = _pooled(f, f_matrix, f_factor)
        rv, _ = _pooled(region, f_matrix, f_factor)
        inside = rv > 0
        points = _points(fv_matrix, inside) - c
        target = fv[inside]
        sample = _sampler(mv, mv_matrix)
        opt = torch.optim.Adam([d_matrix, d_shift], lr=LEARNING_RATE)
        for _ in range(steps):
            opt.zero_grad()
            moved = points @ (eye + d_matrix).T + c + t0 + RADIUS_MM * d_shift
            loss = -_ncc(sample(moved), target) ** 2
            loss.backward()
            opt.step()
        history.append(round(float(-loss.detach()) ** 0.5, 4))
    a = (eye + d_matrix).detach().cpu().numpy().astype(np.float64)
    t = (t0 + RADIUS_MM * d_shift).detach().cpu().numpy().astype(np.float64)
    if history[-1] < MIN_NCC or abs(np.linalg.det(a)) < 0.2:
        raise BadInputError("registration to the template brain failed: the scan could not be aligned with a "
                            "brain (is it a whole-brain MRI?)")
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = centre + t - a @ centre
    return out, {"ncc_per_level": history, "steps": [s for _, _, s in LEVELS], "device": str(device),
                 "seconds": round(time.perf_counter() - started, 3)}


def as_sitk_affine(matrix: np.ndarray):
    """A SimpleITK AffineTransform of a 4x4 (centre at the origin), as preprocess.register's results are kept."""
    import SimpleITK as sitk

    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in matrix[:3, 3]])
    return t

"""The lesion-level operating point: finding scores, healthy rates, the reported findings and their order."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from BrainAnomalyLib.calibration import (BASE_FPR, CalibrationCurve, FindingCalibration, calibration_tables,
                                         choose_threshold, strength)
from BrainAnomalyLib.calibration.findings import FindingRule
from BrainAnomalyLib.detection.postprocess import label_array

SHAPE = (40, 48, 40)
INDEX_TO_RAS = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels, 0.008 mL


def smooth_noise(seed: int) -> np.ndarray:
    """A healthy-looking cleaned map: smooth noise, clipped at 0 (its blobs above 1 % are the false findings)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    return np.maximum(field / field.std(), 0.0).astype(np.float32)


def curve_of(maps) -> CalibrationCurve:
    return CalibrationCurve.from_calibration(calibration_tables([m.ravel() for m in maps]))


def findings_of(arr, curve, calibration=None, target=None):
    return label_array(arr, INDEX_TO_RAS, curve.threshold(BASE_FPR), 0.05,
                       rule=FindingRule(curve, calibration, target))


@pytest.fixture(scope="module")
def calibrated():
    healthy = [smooth_noise(s) for s in range(20)]
    curve = curve_of(healthy)
    per_scan = [[les["finding_score"] for les in findings_of(m, curve)[1]] for m in healthy]
    return curve, FindingCalibration.from_scans(per_scan)


def test_rate_counts_healthy_findings_and_falls_with_the_score(calibrated):
    _, cal = calibrated
    assert cal.n_scans == 20 and cal.scores.size > 40  # several findings per healthy map at 1 %
    s = np.sort(cal.scores)
    # Below the tail the calibration scans' own rate is the plain count of healthy findings scoring at least as
    # high, per scan; the rate reported is an upper bound over resamples of the scans: never below it.
    for v in s[: s.size - 12: 7]:
        assert cal.point_rate(v) == pytest.approx(np.sum(cal.scores >= v) / cal.n_scans, rel=1e-6)
    grid = np.geomspace(s[0] / 2, s[-1] * 20, 400)
    r = cal.rate(grid)
    assert np.all(r >= cal.point_rate(grid) * (1 - 1e-6))
    assert np.all(np.diff(r) <= 1e-12) and r[0] >= s.size / 20 * 0.999
    assert 0 < r[-1] < 1 / 20  # beyond every healthy finding the tail still ranks, below 1 per 20 scans
    for target in (0.05, 0.2, 0.5, 1.0, 2.0):
        assert cal.rate(cal.threshold(target)) == pytest.approx(target, rel=1e-6)
    assert cal.threshold(10.0) <= s[0] or cal.rate(cal.threshold(10.0)) == pytest.approx(10.0)
    back = FindingCalibration.from_dict(cal.to_dict())
    assert back.n_scans == 20 and np.allclose(back.rate(grid), r, rtol=1e-4)  # stored to 6 digits, same seed


def test_held_out_healthy_maps_get_the_target_number_of_findings(calibrated):
    """Calibrated on 20 healthy maps, OTHER healthy maps get about the asked number of findings per scan."""
    curve, cal = calibrated
    counts = {t: [] for t in (0.5, 2.0)}
    for seed in range(100, 130):
        m = smooth_noise(seed)
        for t in counts:
            counts[t].append(len(findings_of(m, curve, cal, t)[1]))
    assert 0.1 <= np.mean(counts[0.5]) <= 1.0, counts[0.5]
    assert 1.0 <= np.mean(counts[2.0]) <= 3.5, counts[2.0]


def test_a_lesion_is_reported_first_and_only_reported_findings_are_labelled(calibrated):
    curve, cal = calibrated
    m = smooth_noise(200)
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    lesion = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 12) ** 2 <= 16
    m[lesion] += 4.0
    everything = findings_of(m, curve, cal)[1]
    mask, reported = findings_of(m, curve, cal, 0.5)
    assert reported and len(reported) < len(everything)
    first = reported[0]
    assert first["label"] == 1 and np.allclose(first["centroid_ijk"], [12, 24, 20], atol=1.0)
    rates = [les["healthy_rate"] for les in reported]
    assert rates == sorted(rates) and max(rates) <= 0.5 and first["healthy_rate"] < 0.05
    assert all(les["healthy_rate"] > 0.5 for les in everything[len(reported):])
    # the label map holds the reported findings only
    assert int(mask.sum()) == sum(les["voxels"] for les in reported)


def test_finding_score_is_the_excess_strength_mass():
    curve = CalibrationCurve(np.array([1e-3, 1e-2, 1e-1]), np.array([3.0, 2.0, 1.0]))
    arr = np.zeros((5, 5, 5), np.float32)
    arr[2, 2, 1:4] = [2.5, 3.0, 2.5]  # strengths 2.5, 3, 2.5 decades; base (FPR 1e-2) is 2
    _, found = label_array(arr, INDEX_TO_RAS, curve.threshold(0.01), 0.0, rule=FindingRule(curve))
    assert len(found) == 1 and found[0]["healthy_rate"] is None
    assert found[0]["finding_score"] == pytest.approx((0.5 + 1.0 + 0.5) * 0.008, rel=1e-3)
    assert strength(curve, np.array([4.0]))[0] == pytest.approx(4.0)  # the last segment carries on


def test_choose_threshold_picks_the_operating_point():
    meta = {"calibration": {"thresholds": {"0.001": 6.0, "0.01": 4.0, "0.05": 3.0},
                            "findings": FindingCalibration.from_scans([[1.0, 0.5], [2.0], [0.2, 0.1, 3.0]]).to_dict()}}
    default = choose_threshold(meta)
    assert default.false_findings == 0.5 and default.value == 4.0 and default.fpr == BASE_FPR
    assert "lesion-level" in default.source and default.to_dict()["false_findings"] == 0.5
    assert choose_threshold(meta, false_findings=2.0).finding_threshold < default.finding_threshold
    voxel = choose_threshold(meta, fpr=0.05)
    assert voxel.false_findings is None and voxel.value == 3.0 and "false_findings" not in voxel.to_dict()
    for bad in (0.01, 11.0):
        with pytest.raises(ValueError, match="between 0.05 and 10"):
            choose_threshold(meta, false_findings=bad)
    with pytest.raises(ValueError, match="only one"):
        choose_threshold(meta, fpr=0.01, false_findings=1.0)
    plain = {"calibration": {"thresholds": {"0.01": 4.0}}}
    assert choose_threshold(plain).false_findings is None  # a model calibrated before findings: voxel default
    with pytest.raises(ValueError, match="no lesion-level calibration"):
        choose_threshold(plain, false_findings=0.5)

"""Voxel-wise standardisation of learned maps against healthy maps (scorers/residual_norm.py), and its place in
training from a manifest."""

import json

import numpy as np
import pytest

from BrainAnomalyLib.core.errors import ModelError
from BrainAnomalyLib.scorers.residual_norm import fit_stats, scan_standardise, standardise


def _healthy_maps(n=40, seed=0):
    """Maps whose spread is 1 on the left half and 4 on the right half, mean 0.5 everywhere; a border slab has
    brain in only a few scans."""
    rng = np.random.default_rng(seed)
    shape = (12, 12, 24)
    spread = np.ones(shape, np.float32)
    spread[..., 12:] = 4.0
    for i in range(n):
        mask = np.ones(shape, bool)
        if i % 5:
            mask[0] = False  # slab 0 is brain in a fifth of the scans only: outside the support
        yield (0.5 + spread * rng.standard_normal(shape)).astype(np.float32), mask


def test_fit_stats_learns_each_voxels_mean_and_spread():
    params, tensors = fit_stats(_healthy_maps(400))
    mean, std = tensors["norm.mean"], tensors["norm.std"]
    assert params["method"] == "voxel" and params["n_scans"] == 400
    inner = (slice(5, 8), slice(4, 8))  # away from the slab outside the support and the blur of the volume edges
    assert np.allclose(mean[inner + (slice(0, 12),)], 0.5, atol=0.25)
    assert np.allclose(std[inner + (slice(3, 7),)], 1.0, atol=0.2)  # the border at 12 is blurred over a few voxels
    assert np.allclose(std[inner + (slice(17, 21),)], 4.0, atol=0.6)
    # Outside the support the pooled statistics stand in.
    assert np.allclose(mean[0], params["pooled_mean"]) and params["pooled_std"] > 2.0
    assert (std >= params["std_floor"]).all()


def test_same_residual_is_less_anomalous_where_healthy_maps_vary_more():
    params, tensors = fit_stats(_healthy_maps(200))
    raw = np.full((12, 12, 24), 3.0, np.float32)
    z = standardise(raw, tensors, params)
    assert z[6, 6, 4] > 2.0 * z[6, 6, 20] > 0
    assert standardise(raw, tensors, None) is raw
    assert standardise(raw, tensors, {"method": "none"}) is raw


def test_per_scan_standardisation_puts_scans_on_one_scale():
    rng = np.random.default_rng(1)
    mask = np.zeros((20, 20, 20), bool)
    mask[2:18, 2:18, 2:18] = True
    base = rng.standard_normal(mask.shape).astype(np.float32)
    base[5:8, 5:8, 5:8] += 6.0  # a lesion: 27 of 4096 brain voxels
    other_scanner = 3.0 + 2.5 * base  # the same scan, shifted and stretched
    a, b = scan_standardise(base, mask, "robust"), scan_standardise(other_scanner, mask, "robust")
    assert np.allclose(a[mask], b[mask], atol=1e-4)
    assert abs(np.median(a[mask])) < 1e-5 and a[6, 6, 6] > 4.0
    assert scan_standardise(base, mask, "none") is base and scan_standardise(base, mask, None) is base
    flat = np.full(mask.shape, 2.0, np.float32)
    assert not scan_standardise(flat, mask, "robust")[mask].any()  # no spread: only the median is removed
    with pytest.raises(ValueError, match="per-scan standardisation"):
        scan_standardise(base, mask, "zscore")


def test_errors_are_clear():
    with pytest.raises(ValueError, match="at least two"):
        fit_stats(_healthy_maps(1))
    params, tensors = fit_stats(_healthy_maps(3))
    with pytest.raises(ModelError, match="norm.std"):
        standardise(np.zeros((12, 12, 24), np.float32), {"norm.mean": tensors["norm.mean"]}, params)
    with pytest.raises(ValueError, match="does not match"):
        standardise(np.zeros((2, 2, 2), np.float32), tensors, params)
    with pytest.raises(ValueError, match="unknown residual standardisation"):
        standardise(np.zeros((12, 12, 24), np.float32), tensors, {"method": "robust"})


def test_training_a_learned_model_adds_healthy_statistics(tmp_path, capsys):
    pytest.importorskip("torch")
    from BrainAnomalyLib.cli.main import main
    from BrainAnomalyLib.store.models import load_model
    from BrainAnomalyLib.detection.pipeline import Detector
    from test_training import _cohort
    from conftest import template_cohort

    csv = _cohort(tmp_path)
    out = tmp_path / "dae"
    code = main(["train", "--model", "dae", "--manifest", str(csv), "--modality", "T1", "-o", str(out),
                 "--allow-few-scans",
                 "--skull-strip", "none", "--no-bias-correction", "--no-register", "--cache-dir",
                 str(tmp_path / "cache"), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4",
                 "--device", "cpu", "--arch", json.dumps({"features": [4, 4, 8, 8, 8, 4]}),
                 "--max-train", "2", "-q"])
    assert code == 0, capsys.readouterr().err
    model = load_model(out)
    assert {"norm.mean", "norm.std"} <= set(model.tensors)  # on by default
    stats = model.meta["params"]["residual_norm"]
    assert stats["n_scans"] == model.meta["training_data"]["n_train"] and stats["std_floor"] > 0
    assert model.meta["params"]["scan_norm"] == "robust"
    image, mask = next(template_cohort(1, seed=9))
    det = Detector(model, device="cpu")
    scores = det.score_grid(image, mask)
    assert np.isfinite(scores.raw_map).all() and not scores.raw_map[~mask].any()
    assert abs(np.median(scores.raw_map[mask])) < 1e-3 and det.scorer.scan_relative
    thr = model.meta["calibration"]["thresholds"]
    assert thr["0.001"] >= thr["0.01"] >= thr["0.05"]


def test_maps_that_are_mostly_exactly_zero_get_a_floor_from_the_pooled_spread():
    rng = np.random.default_rng(2)
    maps = []
    for _ in range(10):
        raw = np.zeros((12, 12, 24), np.float32)
        raw[6, 6, rng.integers(0, 24)] = 5.0  # one changed voxel per scan, the rest untouched
        maps.append((raw, np.ones(raw.shape, bool)))
    params, tensors = fit_stats(maps)
    assert params["std_floor"] >= 0.1 * params["pooled_std"] > 0
    z = standardise(np.full((12, 12, 24), 0.01, np.float32), tensors, params)
    untouched = tensors["norm.mean"] == 0  # voxels no healthy scan ever changed
    assert untouched.sum() > 0.9 * z.size and np.abs(z[untouched]).max() < 10  # a tiny residual stays small


def test_a_combined_score_standardises_each_map_and_averages_them(capsys):
    """score "l1+signed": statistics per map from one pass ("norm.<score>.*"), each map standardised, made
    directional and scan-scaled on its own, then averaged; it equals the mean of the two one-map scorers built
    from the same statistics. Unknown parts and unscaled combinations are refused."""
    torch = pytest.importorskip("torch")
    from BrainAnomalyLib.cli.main import main
    from BrainAnomalyLib.nets import build_net
    from BrainAnomalyLib.core.progress import Reporter
    from BrainAnomalyLib.scorers.learned import fit_residual_norm, score_parts, scorer_class_for
    from conftest import template_cohort

    torch.manual_seed(0)
    net = build_net({"type": "ae_spatial", "channels": [4, 8], "strides": [2, 2], "latent_channels": 2})
    tensors = {f"net.{k}": v.numpy() for k, v in net.state_dict().items()}
    base = {"arch": net.arch, "direction": "hypo", "context": 0, "batch_size": 64}
    volumes = list(template_cohort(3, seed=4))
    params, out = fit_residual_norm("ae_spatial", dict(base, score="l1+signed"), tensors, iter(volumes), Reporter())
    per = params["residual_norm"]["per_score"]
    assert set(per) == {"l1", "signed"} and all(p["n_scans"] == 3 for p in per.values())
    assert {"norm.l1.mean", "norm.l1.std", "norm.signed.mean", "norm.signed.std"} <= set(out)
    image, mask = next(template_cohort(1, seed=11))
    cls = scorer_class_for("ae_spatial")
    both = cls(dict(params, scan_norm="robust"), out).score(image, mask, Reporter()).anomaly_map
    singles = []
    for part in ("l1", "signed"):
        one = {k.replace(f"norm.{part}.", "norm."): v for k, v in out.items() if not k.startswith("norm.")
               or k.startswith(f"norm.{part}.")}
        singles.append(cls(dict(base, score=part, residual_norm=per[part], scan_norm="robust"), one)
                       .score(image, mask, Reporter()).anomaly_map)
    assert np.allclose(both, (singles[0] + singles[1]) / 2, atol=1e-5)
    assert not np.allclose(singles[0], singles[1])
    with pytest.raises(ValueError, match="scan_norm"):
        cls(dict(params, scan_norm="none"), out).score(image, mask, Reporter())
    lacking = dict(params, scan_norm="robust", residual_norm={"method": "voxel", "per_score": {"l1": per["l1"]}})
    with pytest.raises(ModelError, match="no 'signed' map"):
        cls(lacking, out).score(image, mask, Reporter())
    assert score_parts("perceptual+signed") == ["perceptual", "signed"]
    for bad in ("blur", "signed+signed", "signed+"):
        with pytest.raises(ValueError, match="unknown score"):
            score_parts(bad)
    with pytest.raises(SystemExit):
        main(["train", "--model", "dae", "--manifest", "x.csv", "-o", "y", "--score", "signed+blur"])
    assert "unknown score" in capsys.readouterr().err

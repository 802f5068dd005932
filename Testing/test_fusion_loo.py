"""scripts/fusion_loo.py scores its settings on cached grid maps with detection's own code: its fused grid map is the
one FusionDetector makes from the same member maps, and its per-fold AUPRC (one sort serving every fold) is the
library's AUPRC of the other subjects' voxels. Shipped tissue-t2 and tissue-flair members on synthetic template
scans with one bright lesion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.detection.fusion import FusionDetector
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.evaluation.metrics import average_precision
from BrainAnomalyLib.store.models import resolve_model
from BrainAnomalyLib.synth.appearance import healthy_template_scan

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fusion_loo.py"
MEMBERS = {"T2": "tissue-t2", "FLAIR": "tissue-flair"}


@pytest.fixture(scope="module")
def loo():
    spec = importlib.util.spec_from_file_location("fusion_loo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subjects():
    """Two synthetic subjects' grid volumes, raw member maps and labels, a lesion on a different side in each."""
    grid = Grid()
    zz, yy, xx = np.indices(tuple(reversed(grid.size)))
    detectors = {i: Detector(resolve_model(i), device="cpu") for i in MEMBERS.values()}
    out = {}
    for seed, centre in ((3, (48, 60, 30)), (5, (44, 70, 62))):
        lesion = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= 25
        images, d = {}, {}
        for m, i in MEMBERS.items():
            image, mask = healthy_template_scan(m, seed, grid)
            images[m] = np.where(lesion & mask, 1.4 * np.percentile(image[mask], 99), image).astype(np.float32)
            d[f"{m}|{i}"] = detectors[i].scorer.score(images[m], mask, Reporter()).anomaly_map
        d.update(mask=mask, label=lesion & mask)
        out[f"s{seed}"] = (images, d)
    return detectors, out


def _setting(rule="mean", t2=0.5, t2_mirror=0.5, flair_mirror=0.0):
    return {"rule": rule, "members": {"T2": ("tissue-t2", t2, t2_mirror),
                                      "FLAIR": ("tissue-flair", 1.0, flair_mirror)}}


@pytest.mark.parametrize("rule", ["mean", "rms"])
def test_fused_grid_is_what_the_fusion_detector_makes(loo, subjects, rule):
    detectors, data = subjects
    images, d = data["s3"]

    def native(setting):
        det = FusionDetector(loo.fusion_model(setting), device="cpu")
        return det.score_grid(images, d["mask"]).clean_map[d["mask"]]

    grid = loo.fused_grid(d, _setting(rule), {}, detectors)
    assert np.array_equal(grid, native(_setting(rule)))
    # a weight of 0 leaves the member out, as detection's fuse does
    alone = loo.fused_grid(d, _setting(rule, t2=0.0, t2_mirror=0.0), {}, detectors)
    assert not np.allclose(alone, grid)
    assert np.array_equal(alone, native(_setting(rule, t2=0.0, t2_mirror=0.0)))


def test_the_shipped_members_grid_searches_positive_weights_of_fixed_members(loo):
    four = list(loo.settings(True, "shipped-members", ("mean", "rms")))
    three = list(loo.settings(False, "shipped-members", ("mean",)))
    assert len(four) == 2 * 3 * 2 * 3 and len(three) == 3 * 3
    for s in four + three:
        assert {m: i for m, (i, _, _) in s["members"].items()} == {
            m: i for m, i in loo.SHIPPED_MEMBERS.items() if m in s["members"]}
        assert all(w > 0 for _, w, _ in s["members"].values())
        assert s["members"]["T2"][2] == 0.5 and s["members"]["FLAIR"][2] == 0.25  # the members' own
    assert "T1CE" not in three[0]["members"]
    assert len({json.dumps(s, sort_keys=True) for s in four}) == len(four)


def test_each_folds_grid_auprc_is_the_auprc_of_the_other_subjects(loo, subjects):
    detectors, data = subjects
    maps = {s: d for s, (_, d) in data.items()}
    names = sorted(maps)
    settings = [_setting(t2=w, flair_mirror=0.25) for w in (0.25, 1.0)]
    rows = loo.grid_scores(maps, names, settings, detectors)
    for setting, row in zip(settings, rows):
        heat = {s: loo.fused_grid(maps[s], setting, {}, detectors) for s in names}
        truth = {s: maps[s]["label"][maps[s]["mask"]] for s in names}
        assert row["all"] == average_precision(np.concatenate([heat[s] for s in names]),
                                               np.concatenate([truth[s] for s in names]))
        for held, other in zip(names, reversed(names)):
            assert row[held] == average_precision(heat[other], truth[other])
    assert rows[0]["all"] != rows[1]["all"]  # the setting matters, so the rows say something

#!/usr/bin/env python
"""Leave-one-case-out choice and measurement of a fusion model's tuned settings on a small labelled set.

    python scripts/fusion_loo.py --manifest ../shared/data/brats18_dev.csv --cache build/fusion-loo -o loo.json
        [--without-t1ce] [--grid full|shipped-members] [--rules mean,rms]

The settings tuned are those of a four-contrast fusion (T1, T1CE, T2, FLAIR; with --without-t1ce a three-contrast
one without T1CE). With --grid full (fusion-t1-t2-flair's card): each contrast's member model (a scorer choice for
T2 and FLAIR), the T1, T1CE and T2 weights beside FLAIR's 1, and whether the T1, T2 and FLAIR members subtract their
contralateral mirror (at the weight measured for it; T1CE's always at its own); a member whose weight is 0 is left
out. With --grid shipped-members (fusion-t1-t1ce-t2-flair's card) the members are fixed and only positive weights
searched (see GRIDS). --rules: the fusion rules searched (scorers/fusion.py), each setting's rule one more choice.
For every case held out, the setting with the best pooled AUPRC over the other cases' grid maps is picked (grid
maps: each contrast on the T1 scan's registration, as detection brings them, cached in --cache, and fused by
detection's own post-processing and fuse); then the held-out case is detected with its pick on its own grid,
exactly as `evaluate` does, and the held-out maps of all cases are pooled into AUPRC and best Dice over the brain
voxels. The setting best on all cases (the one a model would ship with) is reported too, with its in-sample grid
AUPRC. An ensemble (ensemble-ae-t1-ixi) cannot be a member: a fusion's members are single models
(store.ensembles.build_fusion), so the T1 member is dpa-t1-ixi.
"""

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import BadInputError  # noqa: E402
from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.core.manifest import group_by_subject, read_manifest  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.detection.fusion import FusionDetector  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import (PostprocessConfig, clean_in_template, clip_to_mask,  # noqa: E402
                                                    erode_mask, filter_map, robust_stats)
from BrainAnomalyLib.evaluation.metrics import average_precision, best_dice, descending_order  # noqa: E402
from BrainAnomalyLib.preprocess.chain import companion_coverage, preprocess_companion  # noqa: E402
from BrainAnomalyLib.scorers.fusion import FusionScorer  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessed  # noqa: E402
from BrainAnomalyLib.store.ensembles import build_fusion  # noqa: E402
from BrainAnomalyLib.store.models import Model, resolve_model  # noqa: E402

# Candidate members per contrast and the contralateral weight each was measured with (grid AUPRC, brats18_dev).
# The order is the fusion's member order (T1, the reference contrast, first).
CHOICES = {"T1": ["dpa-t1-ixi"], "T1CE": ["tissue-t1ce"], "T2": ["tissue-t2", "intensity-t2"],
           "FLAIR": ["tissue-flair", "intensity-flair"]}
MIRROR = {"T1": 0.75, "T1CE": 0.5, "T2": 0.5, "FLAIR": 0.25}
WEIGHTS = (0.0, 0.25, 0.5, 1.0)
T1CE_WEIGHTS = (0.0, 0.25, 0.5)  # T1CE alone scores 0.37 (tissue-t1ce): a minor member at most
# The grids searched. "full": every contrast's scorer (tissue or intensity for T2 and FLAIR), each member's
# contralateral subtraction on or off and its weight (0 drops the contrast). "shipped-members": the members fixed
# beforehand, each contrast's shipped model best alone on brats18_dev (docs/benchmark/default-run.md: tissue-t2
# 0.644 over intensity-t2 0.527, tissue-flair 0.867 over intensity-flair 0.815) post-processed as it ships (its own
# contralateral weight), and only the weights beside FLAIR's 1 searched, none 0: a contrast given to a fusion of it
# takes part. Fewer choices to fit to four cases, and no fold can drop a contrast the others happen not to need.
GRIDS = ("full", "shipped-members")
SHIPPED_MEMBERS = {"T1": "dpa-t1-ixi", "T1CE": "tissue-t1ce", "T2": "tissue-t2", "FLAIR": "tissue-flair"}
FUSED_POST = PostprocessConfig(median_size=1)  # the fusion's own post-processing (its members filter their maps)


def settings(with_t1ce: bool = True, grid: str = "full", rules=("mean",)):
    """The candidate settings, each {"rule": ..., "members": {contrast: (model id, weight, contralateral)}};
    without T1CE, those of a three-contrast fusion (no T1CE member at all). See GRIDS."""
    for rule in rules:
        for members in (_full if grid == "full" else _shipped_members)(with_t1ce):
            yield {"rule": rule, "members": members}


def _full(with_t1ce: bool):
    for t1w, cew, t2w, t2m, flm, m1, m2, m3 in itertools.product(WEIGHTS, T1CE_WEIGHTS if with_t1ce else (None,),
                                                                 WEIGHTS, CHOICES["T2"], CHOICES["FLAIR"],
                                                                 (0, 1), (0, 1), (0, 1)):
        if (t1w == 0 and m1) or (t2w == 0 and (m2 or t2m != CHOICES["T2"][0])):
            continue  # an unused member's options change nothing
        setting = {"T1": ("dpa-t1-ixi", t1w, MIRROR["T1"] * m1)}
        if with_t1ce:
            setting["T1CE"] = ("tissue-t1ce", cew, MIRROR["T1CE"])
        yield dict(setting, T2=(t2m, t2w, MIRROR["T2"] * m2), FLAIR=(flm, 1.0, MIRROR["FLAIR"] * m3))


def _shipped_members(with_t1ce: bool):
    members = {m: (i, own_contralateral(i)) for m, i in SHIPPED_MEMBERS.items() if with_t1ce or m != "T1CE"}
    chosen = [m for m in members if m != "FLAIR"]
    for weights in itertools.product(*(T1CE_WEIGHTS[1:] if m == "T1CE" else WEIGHTS[1:] for m in chosen)):
        w = dict(zip(chosen, weights), FLAIR=1.0)
        yield {m: (i, w[m], c) for m, (i, c) in members.items()}


def own_contralateral(model_id: str) -> float:
    return float(resolve_model(model_id).meta.get("postprocess", {}).get("contralateral") or 0.0)


def grid_maps(subject, cases, cache: Path, detectors) -> dict:
    """Each candidate member's raw grid map of one subject, every contrast on the T1 registration (cached)."""
    path = cache / f"{subject}.npz"
    wanted = {f"{m}|{i}" for m, ids in CHOICES.items() for i in ids}
    rows = {c.modality: c for c in cases}
    scans = {m: read_volume(rows[m].image) for m in CHOICES}
    ref = detectors["dpa-t1-ixi"]
    pre = reference_preprocessing(rows["T1"], scans["T1"], ref)
    if path.is_file():
        out = dict(np.load(path))
        if wanted <= set(out):
            # A subject detection would refuse (a companion without signal over part of the brain) is refused
            # here too, as preprocess_companion below refuses it when the maps are made.
            for m in [m for m in CHOICES if m != "T1"]:
                companion_coverage(scans[m], pre, scans["T1"])
            return out
    images = {"T1": pre.image}
    for m in [m for m in CHOICES if m != "T1"]:
        images[m] = preprocess_companion(scans[m], pre, scans["T1"], ref.preprocess_config, Reporter()).image
    truth = sitk.ReadImage(str(rows["T1"].mask))
    out = {"mask": pre.mask, "label": sitk.GetArrayFromImage(sitk.Resample(
        truth, pre.grid.reference(), pre.transform, sitk.sitkNearestNeighbor, 0)) > 0}
    for m, ids in CHOICES.items():
        for i in ids:
            out[f"{m}|{i}"] = detectors[i].scorer.score(images[m], pre.mask, Reporter()).anomaly_map
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **out)
    return out


def reference_preprocessing(row, scan, detector):
    """The T1 scan's preprocessing as `evaluate` gets it (store.cache: the scan is registered once across runs)."""
    return cached_preprocessed(row.image, scan, detector.preprocess_config, detector.grid)


def member_map(d: dict, model_id: str, modality: str, mirror: float, detector: Detector) -> tuple:
    """One member's map as detection post-processes it before fusing (detection.fusion.FusionDetector.score_grid:
    the member's own filtering with the setting's contralateral weight) and its robust statistics on this scan."""
    post = replace(detector.postprocess_config, contralateral=mirror)
    filtered = clean_in_template(d[f"{modality}|{model_id}"], d["mask"], post, detector.grid)
    return filtered, robust_stats(filtered[erode_mask(d["mask"], post)])


def fused_grid(d: dict, setting: dict, cache: dict, detectors) -> np.ndarray:
    """The fused, cleaned grid map of one subject as detection makes it (each member's map as `member_map`, the
    fusion scorer's own fuse, the fusion's post-processing), at the brain voxels. `cache` keeps the members'
    maps: a setting's weights do not change them."""
    maps, stats = {}, {}
    for m, (model_id, w, mirror) in setting["members"].items():
        if w == 0:
            continue
        key = (id(d), m, model_id, mirror)
        if key not in cache:
            cache[key] = member_map(d, model_id, m, mirror, detectors[model_id])
        maps[m], stats[m] = cache[key]
    members = setting["members"]
    scorer = FusionScorer({"members": [{"modality": m} for m in members], "rule": setting["rule"],
                           "weights": [w for _, w, _ in members.values()]}, {})
    fused = filter_map(scorer.fuse(maps, stats), FUSED_POST)
    return clip_to_mask(fused, erode_mask(d["mask"], FUSED_POST))[d["mask"]]


def fusion_model(setting: dict) -> Model:
    """The fusion of `setting` as an in-memory model (what make_fusion_model.py would write, uncalibrated)."""
    chosen = setting["members"]
    members = [(m, resolve_model(i)) for m, (i, _, _) in chosen.items()]
    # The contralateral weight is written even when 0: a member's own (e.g. tissue-t2's 0.5) would apply otherwise.
    params = build_fusion(members, weights=[w for _, w, _ in chosen.values()],
                          postprocess=[{"contralateral": c} for _, _, c in chosen.values()], rule=setting["rule"])
    template = members[0][1]
    meta = dict(template.meta, name="fusion-loo", kind="fusion", params=params,
                postprocess=FUSED_POST.to_dict(), inputs=list(chosen))
    meta.pop("calibration", None)
    return Model(Path("."), meta, members=[m for _, m in members])


def native(detector: FusionDetector, cases) -> tuple:
    """The held-out case detected as `evaluate` detects it: heat and truth at the brain voxels of its T1 grid."""
    rows = {c.modality: c for c in cases}
    scans = {m: read_volume(rows[m].image) for m in detector.modalities}
    pre = reference_preprocessing(rows["T1"], scans["T1"], detector)
    analysis = detector.analyse_contrasts(scans, pre=pre)
    result = detector.to_result(scans["T1"], analysis, detector.threshold(), detector.label(scans),
                                with_reconstruction=False)
    brain = analysis.pre.native_mask
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(rows["T1"].mask))) > 0
    return sitk.GetArrayFromImage(result.anomaly_map)[brain], truth[brain]


def grid_scores(data: dict, names, all_settings, detectors) -> list:
    """Per setting, the pooled grid AUPRC over all subjects ("all") and over all but each one (by subject)."""
    cache: dict = {}
    scores = []
    labels = np.concatenate([data[s]["label"][data[s]["mask"]] for s in names])
    groups = np.concatenate([np.full(int(data[s]["mask"].sum()), i) for i, s in enumerate(names)])
    for n, setting in enumerate(all_settings):
        pooled = np.concatenate([fused_grid(data[s], setting, cache, detectors) for s in names])
        order = descending_order(pooled)  # one sort serves all folds: a fold's subset of it stays sorted
        ranked, y, g = pooled[order], labels[order], groups[order]
        row = {"all": average_precision(ranked, y, np.arange(ranked.size))}
        for i, held in enumerate(names):
            keep = g != i
            row[held] = average_precision(ranked[keep], y[keep], np.arange(int(keep.sum())))
        scores.append(row)
        if (n + 1) % 20 == 0:
            print(f"setting {n + 1}/{len(all_settings)}", file=sys.stderr, flush=True)
    return scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--cache", required=True, type=Path, help="folder for the subjects' grid maps")
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--without-t1ce", action="store_true", help="the three-contrast fusions only (T1, T2, FLAIR)")
    ap.add_argument("--grid", choices=GRIDS, default="full", help="the settings searched (see GRIDS)")
    ap.add_argument("--rules", default="mean", help="the fusion rules searched, comma-separated (mean, rms)")
    args = ap.parse_args()
    subjects = group_by_subject(read_manifest(args.manifest), list(CHOICES))
    detectors = {i: Detector(resolve_model(i), device="cpu") for ids in CHOICES.values() for i in ids}
    data, refused = {}, []
    for s, cases in subjects.items():
        try:
            data[s] = grid_maps(s, cases, args.cache, detectors)
        except BadInputError as exc:  # as detection refuses the subject: left out of every fold
            refused.append(f"{s}: {exc}")
            print(f"{s} left out: {exc}", file=sys.stderr, flush=True)
    names = sorted(data)
    rules = args.rules.split(",")
    all_settings = list(settings(not args.without_t1ce, args.grid, rules))
    # the grid stage, kept so a failed native stage need not redo it
    done = args.cache / f"grid_scores-{args.grid}-{'-'.join(rules)}{'-without-t1ce' if args.without_t1ce else ''}.json"
    kept = json.loads(done.read_text()) if done.is_file() else {}
    if kept.get("settings") == json.loads(json.dumps(all_settings)) and kept.get("subjects") == names:
        scores = kept["scores"]
    else:
        scores = grid_scores(data, names, all_settings, detectors)
        done.write_text(json.dumps({"settings": all_settings, "subjects": names, "scores": scores}))
    best = max(range(len(all_settings)), key=lambda i: scores[i]["all"])
    report = {"grid": args.grid, "rules": rules, "n_settings": len(all_settings), "best_on_all": all_settings[best],
              "best_on_all_grid_auprc_in_sample": scores[best]["all"], "refused": refused, "folds": {}}
    heat, truth = [], []
    for held in names:
        pick = max(range(len(all_settings)), key=lambda i: scores[i][held])
        h, t = native(FusionDetector(fusion_model(all_settings[pick]), device="cpu"), subjects[held])
        heat.append(h)
        truth.append(t)
        report["folds"][held] = {"pick": all_settings[pick], "train_grid_auprc": scores[pick][held],
                                 "held_out_native_auprc": average_precision(h, t)}
        print(held, report["folds"][held], file=sys.stderr, flush=True)
    heat, truth = np.concatenate(heat), np.concatenate(truth)
    report["loo_native_pooled"] = {"auprc": average_precision(heat, truth), "best_dice": best_dice(heat, truth)[0]}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["loo_native_pooled"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

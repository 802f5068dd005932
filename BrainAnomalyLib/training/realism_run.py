"""The realism check (evaluation/realism.py) on the scans of a training manifest: run by `brainanomaly train` after a
ddpm or ldm is trained, and by scripts/diffusion_realism.py on a model trained earlier.

Both take the slices the way training does (learn/slices.py: axial slices with at least 5 % brain, with the model's
context channels) from the preprocessing cache, and the subjects from training.split_subjects:
- held-out real slices: the calibration split, which the net never trained on nor stopped early on;
- the training reference: slices of the subjects the net was fitted on, spread over every subject and over z.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np

from ..core.subsets import spread_pick
from ..store.cache import grid_volumes
from ..core.progress import Reporter
from ..evaluation.realism import (DEFAULT_ENCODER, DEFAULT_SAMPLES, DEFAULT_STEPS, Encoder, load_encoder,
                                  realism_report, write_realism)

HELD_OUT_SLICES = 2048  # bounds memory; the calibration split of a 116-subject cohort has about 1600
SAMPLING_TYPES = ("ddpm", "ldm")


def spread_slices(volumes, n_volumes: int, limit: int, context: int = 0):
    """At most `limit` training-style slices (x, mask) of (image, mask) `volumes`, as evenly as possible from each of
    the `n_volumes` volumes and, within one, over z; only the picked slices are kept in memory."""
    from ..learn.slices import slices_from_volume

    per = max(1, math.ceil(limit / max(n_volumes, 1)))
    xs, ms = [], []
    for image, mask in volumes:
        x, m, _ = slices_from_volume(image, mask, context=context)
        if len(x):
            pick = spread_pick(len(x), per)
            xs.append(x[pick])
            ms.append(m[pick])
    if not xs:
        raise ValueError("realism: no slices with brain in the scans")
    x, m = np.concatenate(xs), np.concatenate(ms)
    pick = spread_pick(len(x), limit)
    return x[pick], m[pick]


def realism_for_cases(net, fit_cases, held_cases, pre, grid, out_dir, *, context: int = 0,
                      modality: Optional[str] = None, encoder=DEFAULT_ENCODER, n: int = DEFAULT_SAMPLES,
                      steps: int = DEFAULT_STEPS, seed: int = 0, batch: int = 32, device: str = "cpu",
                      cache_dir=None, reporter: Optional[Reporter] = None) -> dict:
    """realism_report for `net` with held-out slices of `held_cases` and training slices of `fit_cases` (manifest
    Cases, read through `pre` and `grid` from the cache). `encoder`: an Encoder, or a model name or folder."""
    reporter = reporter or Reporter()
    if net.sampling_refusal:
        raise ValueError(f"{net.type_name} cannot sample slices from noise: {net.sampling_refusal}")
    enc = encoder if isinstance(encoder, Encoder) else load_encoder(encoder, device)
    enc.check_fits((0, net.in_channels, *net.size), modality)  # before any scan is read
    if not held_cases or not fit_cases:
        raise ValueError("realism: needs held-out (calibration) and training subjects")
    quiet = Reporter(cancel=reporter.cancel)
    held = spread_slices(grid_volumes(held_cases, pre, grid, quiet, cache_dir, skipped=[]), len(held_cases),
                         HELD_OUT_SLICES, context)
    train = spread_slices(grid_volumes(fit_cases, pre, grid, quiet, cache_dir, skipped=[]), len(fit_cases), n,
                          context)
    about = {"held_out": f"calibration split: {len({c.subject for c in held_cases})} subjects",
             "training_reference": f"{len({c.subject for c in fit_cases})} training subjects"}
    return realism_report(net, held, train, enc, n, steps, seed, batch, out_dir, modality, device,
                          progress=lambda f: reporter("realism check: sampling", f), about=about)


def check_after_training(kind: str, params: dict, tensors: dict, fit_cases, held_cases, pre, grid, out_dir,
                         modality: str, options: dict, cache_dir=None, reporter: Optional[Reporter] = None):
    """The realism check at the end of `train` for the types that can sample (options: realism_samples, 0 skips;
    realism_steps; realism_encoder; device; seed). Whatever goes wrong (no encoder installed, one of another
    modality or context, ...) is one log line and a realism.json saying why: the trained model stands either way."""
    from ..core.device import resolve_device
    from ..core.errors import Cancelled
    from ..scorers.learned import scorer_class_for

    n = int(options.get("realism_samples", DEFAULT_SAMPLES))
    if kind not in SAMPLING_TYPES or n <= 0:
        return None
    encoder = options.get("realism_encoder") or DEFAULT_ENCODER
    try:
        device = resolve_device(options.get("device") or "auto")
        net = scorer_class_for(kind)(params, tensors, device).net()
        return realism_for_cases(net, fit_cases, held_cases, pre, grid, out_dir,
                                 context=int(params.get("context", 0)), modality=modality, encoder=encoder, n=n,
                                 steps=int(options.get("realism_steps", DEFAULT_STEPS)),
                                 seed=int(options.get("seed") or 0), device=device, cache_dir=cache_dir,
                                 reporter=reporter)
    except Cancelled:
        raise
    except Exception as exc:  # an auxiliary report must not cost the trained model
        reason = f"{type(exc).__name__}: {exc}"
        print(f"realism check skipped: {reason}", file=sys.stderr, flush=True)
        write_realism(out_dir, {"skipped": reason, "encoder": str(encoder), "n_samples": n})
        return None

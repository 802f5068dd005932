#!/usr/bin/env python
"""Seconds per volume of the reference AnoDDPM implementation next to our `ddpm` scorer, on the same machine, volume
and thread count, back to back, as a ratio reference / ours.

What is compared. Our `ddpm` (nets/diffusion.py) is AnoDDPM's method (Wyatt et al., CVPR-W 2022: noise a slice
part-way with simplex noise, let a DDPM trained on healthy slices denoise it, score the residual) with two speed
choices of ours: a few deterministic DDIM steps per noise level instead of one ancestral step per training step, and
all slices of a volume in one batch. The reference is the authors' public code, which this script imports from
--reference-dir and never copies (see FETCH below): GaussianDiffusionModel.forward_backward with simplex noise, the
path detection.py's anomalous_metric_calculation() scores with, followed by its squared-error map. Its inference
settings are taken as published, not tuned:
  - one slice per call, as detection.py does (their simplex noise generator only produces one slice's noise:
    batches > 1 fail with simplex noise);
  - noise to t and denoise with every one of the t ancestral DDPM steps, a fresh simplex draw per step
    (denoise_fn = "simplex"); t = 200 as anomalous_metric_calculation() hard-codes, and t = 250, the paper's
    lambda for MRI (--ref-t to change);
  - "matched": the same number of network evaluations per slice as ours (len(t_stars) x ddim_steps, 15 at our
    defaults), i.e. forward_backward with t_distance = ddim_steps once per noise level, averaged. Their sampler
    cannot stride over steps, so this isolates what the DDPM loop, the per-step simplex draws and the
    one-slice-at-a-time batching cost apart from the step count.
The network: both sides have random weights (the cost does not depend on them) and are matched in size. Ours is
build_net(default_arch("ddpm")) (MONAI DiffusionModelUNet, channels 32/64/64/128, one res block per level,
attention at the coarsest level, 32-channel heads). Theirs (--ref-arch matched) is their UNetModel with
base_channels 32, channel_mults (1, 2, 2, 4), num_res_blocks 1, attention at downsampling factor 8,
n_head_channels 32 and biggan_updown=False (convolutional down/upsampling like MONAI's; their own configs leave the
default True, resblock up/down, about 20 % more FLOPs): the same parameter count as ours and the FLOPs per
evaluation printed in the table (within a few %). --ref-arch published builds their published 256 x 256 network
instead (base 128, mults 1,1,2,2,4,4, two res blocks, attention at 16 and 8 pixels of 256, two heads; about 130 M
parameters at this size); it needs sides divisible by 32, so the 112 x 96 slices are padded to 128 x 96 with background.
The volume is the bundled template on the model grid (80 axial slices of 112 x 96, as scripts/benchmark_diffusion.py
builds it), standardised for ours and mapped linearly to [-1, 1] for theirs (their data range). --slices N times the
N central slices and scales to 80 (every slice costs the same). Our time is net.reconstruct + net.score_maps with all
timed slices in one batch (as the learned scorer does), and again one slice per call. Both sides get one untimed
warm-up call (numba compiles their noise kernels on first use; our noise images are drawn once per level and
shape). torch and numba use --threads threads (default: torch's default).

FETCH. The reference is not part of this repository. Get it with
    git clone https://github.com/Julian-Wyatt/AnoDDPM /path/to/AnoDDPM
(measured with the files as of commit 6419544404944a56eda394a8c263f6ee7dd251af: GaussianDiffusion.py last changed in
3052f0441a472af55d6e8b1028f5d3156f3d6ed3, UNet.py in 6419544, simplex.py in af4cc5b03ca186c1e610d2729883cba40d0f88ea,
helpers.py in 718dbfc2666f0ec5654b1c7f19489b96223dc8f0, evaluation.py in a9227b7fd614b144797ee69c4db1cb2c8a0b6e48).
Their modules need numba (the simplex noise, on the timed path); scikit-image and torchvision are imported for
metrics and plotting only and are replaced by empty stand-ins here when missing. Install what is missing away from
the project's environment, e.g. `pip install --target /path/to/refdeps numba scikit-image`, and pass
--deps /path/to/refdeps.

    python scripts/benchmark_reference.py --reference-dir /path/to/AnoDDPM --deps /path/to/refdeps
    python scripts/benchmark_reference.py --reference-dir /path/to/AnoDDPM --slices 4 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

REPO_URL = "https://github.com/Julian-Wyatt/AnoDDPM"
REF_COMMIT = "6419544404944a56eda394a8c263f6ee7dd251af"
# file -> what this script calls in it (checked before importing, so a wrong directory gets a clear message)
REF_NEEDS = {
    "GaussianDiffusion.py": ("class GaussianDiffusionModel", "def forward_backward", "def get_beta_schedule",
                             "def generate_simplex_noise"),
    "UNet.py": ("class UNetModel", "biggan_updown"),
    "simplex.py": ("class Simplex_CLASS", "def rand_3d_fixed_T_octaves"),
    "helpers.py": ("def gridify_output",),
    "evaluation.py": ("def heatmap",),
}
# imported by their modules for plotting / metrics only; never called on the timed path
OPTIONAL_IMPORTS = ("torchvision", "torchvision.utils", "skimage", "skimage.metrics")


def fetch_instructions(directory) -> str:
    return (f"{directory} does not hold the reference AnoDDPM code (needs {', '.join(REF_NEEDS)}).\n"
            f"Fetch it outside this repository (it is not vendored here):\n"
            f"    git clone {REPO_URL} /path/to/AnoDDPM\n"
            f"    git -C /path/to/AnoDDPM checkout {REF_COMMIT}\n"
            f"then pass --reference-dir /path/to/AnoDDPM. Their simplex noise needs numba: if it is not installed, "
            f"`pip install --target /path/to/refdeps numba` and add --deps /path/to/refdeps.")


def reference_problems(directory: Path):
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = []
    for name, needs in REF_NEEDS.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{name} has no {need!r}" for need in needs if need not in text]
    return problems


def import_reference(directory: Path, deps, threads: int):
    """(GaussianDiffusion module, UNet module, stand-ins used) imported from the reference directory."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    for extra in reversed(deps or []):
        sys.path.insert(0, str(Path(extra).resolve()))
    sys.path.insert(0, str(directory.resolve()))
    try:
        import numba
    except ImportError:
        sys.exit("The reference's simplex noise (simplex.py) needs numba, which is not importable here.\n"
                 "Install it away from the project's environment: pip install --target /path/to/refdeps numba\n"
                 "and pass --deps /path/to/refdeps.")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    stubs = []
    for name in OPTIONAL_IMPORTS:
        try:
            __import__(name)
        except Exception:  # missing, or a build that does not load against this torch
            sys.modules[name] = types.ModuleType(name)
            stubs.append(name)
    if "torchvision.utils" in stubs:
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    if "skimage.metrics" in stubs:
        sys.modules["skimage.metrics"].structural_similarity = None
        sys.modules["skimage"].metrics = sys.modules["skimage.metrics"]
    import GaussianDiffusion
    import UNet
    return GaussianDiffusion, UNet, stubs


def build_reference_unet(UNet, arch: str, size):
    """Their UNetModel, matched to our default ddpm arch or as published; (model, padded input size (H, W))."""
    h, w = size
    if arch == "matched":
        net = UNet.UNetModel(h, 32, channel_mults=(1, 2, 2, 4), num_res_blocks=1, attention_resolutions=str(h // 8),
                             n_head_channels=32, biggan_updown=False, in_channels=1)
        return net, (h, w)
    pad = lambda s: -(-s // 32) * 32  # noqa: E731  six levels: sides divisible by 32
    net = UNet.UNetModel(256, 128, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attention_resolutions="16,8",
                         n_heads=2, n_head_channels=-1, in_channels=1)
    return net, (pad(h), pad(w))


def gflop_per_eval(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, type=Path, help="a checkout of the AnoDDPM repository")
    ap.add_argument("--deps", nargs="*", default=[], help="folders put on sys.path for the reference's dependencies "
                                                           "(e.g. a pip --target folder with numba)")
    ap.add_argument("--slices", type=int, default=None, help="time this many central slices (default: all 80) and "
                                                              "scale to the volume")
    ap.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: torch's default)")
    ap.add_argument("--ref-t", type=int, nargs="+", default=[200, 250],
                    help="noise levels of the reference's published path (default: 200 = detection.py, 250 = paper)")
    ap.add_argument("--ref-arch", choices=("matched", "published"), default="matched")
    ap.add_argument("--no-matched", action="store_true", help="skip the reference at our evaluation count")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each row; the median is reported")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    directory = args.reference_dir
    problems = reference_problems(directory)
    if problems:
        print("; ".join(problems), file=sys.stderr)
        print(fetch_instructions(directory), file=sys.stderr)
        return 2

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    GD, UNet, stubs = import_reference(directory, args.deps, threads)

    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from benchmark_diffusion import grid_volume

    from BrainAnomalyLib.learn.slices import volume_slices_for_scoring
    from BrainAnomalyLib.nets import build_net, count_parameters, default_arch

    image, mask = grid_volume()
    all_slices, _ = volume_slices_for_scoring(image, mask, 0)
    z = all_slices.shape[0]
    n = min(args.slices or z, z)
    first = (z - n) // 2
    ours_x = torch.from_numpy(np.ascontiguousarray(all_slices[first:first + n]))
    lo, hi = float(all_slices.min()), float(all_slices.max())
    size = tuple(ours_x.shape[-2:])

    load_before = os.getloadavg()
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} torch/numba "
          f"thread(s); load average {load_before[0]:.2f} (1 min) at start; volume {z} slices of {size[0]} x "
          f"{size[1]}" + (f"; timing {n} central slices, scaled to {z}" if n < z else ""))
    if stubs:
        print(f"reference imports replaced by empty stand-ins (plotting/metrics only, not timed): {', '.join(stubs)}")

    rows = []

    def timed(fn) -> float:
        """Median seconds per slice of fn() over --repeats runs."""
        times = []
        for _ in range(max(1, args.repeats)):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) / n)
        return statistics.median(times)

    def add(method, settings, evals, params, gflop, seconds_per_slice, slices_timed):
        rows.append({"method": method, "settings": settings, "evals_per_slice": evals, "parameters": params,
                     "gflop_per_eval": round(gflop, 3), "seconds_per_volume": round(seconds_per_slice * z, 2),
                     "seconds_per_slice": round(seconds_per_slice, 4), "slices_timed": slices_timed,
                     "repeats": max(1, args.repeats)})
        print(f"  {method}: {settings}: {seconds_per_slice * z:.1f} s/volume", flush=True)

    # ---------------------------------------------------------------- ours
    torch.manual_seed(0)
    net = build_net(default_arch("ddpm")).eval()
    evals_ours = len(net.noise_levels) * net.ddim_steps
    levels = ", ".join(f"t*={t0}" for t0, _ in net.noise_levels)
    gflop_ours = gflop_per_eval(lambda: net.unet(ours_x[:1], timesteps=torch.tensor([100])))
    params_ours = count_parameters(net)

    def ours(batch):
        with torch.no_grad():
            for s in range(0, n, batch):
                xb = ours_x[s:s + batch]
                net.score_maps(xb, net.reconstruct(xb))["signed"].float().cpu()

    net.score_maps(ours_x[:1], net.reconstruct(ours_x[:1]))  # warm-up; draws the per-level noise images
    for batch, label in ((n, f"all {n} timed slice(s) in one batch"), (1, "one slice per call")):
        add("ours ddpm", f"{net.noise_kind} noise, {levels}, {net.ddim_steps} DDIM steps each; {label}",
            evals_ours, params_ours, gflop_ours, timed(lambda: ours(batch)), n)
    net = None  # frees it before the reference runs (`ours` shares this variable, so no `del`)

    # ---------------------------------------------------------------- reference
    torch.manual_seed(0)
    ref_net, padded = build_reference_unet(UNet, args.ref_arch, size)
    ref_net.eval()
    diff = GD.GaussianDiffusionModel(list(padded), GD.get_beta_schedule(1000, "linear"), img_channels=1,
                                     loss_type="l2", loss_weight="none", noise="simplex")
    ref_x = (ours_x - lo) / (hi - lo) * 2.0 - 1.0
    if padded != size:
        ref_x = torch.nn.functional.pad(ref_x, (0, padded[1] - size[1], 0, padded[0] - size[0]), value=-1.0)
    gflop_ref = gflop_per_eval(lambda: ref_net(ref_x[:1], torch.tensor([100])))
    params_ref = sum(p.numel() for p in ref_net.parameters())
    arch_label = ("their UNet matched to ours" if args.ref_arch == "matched"
                  else f"their published UNet, input padded to {padded[0]} x {padded[1]}")

    def reference(t_distance, repeats):
        for i in range(n):
            x0 = ref_x[i:i + 1]
            outs = [diff.forward_backward(ref_net, x0, see_whole_sequence=None, t_distance=t_distance,
                                          denoise_fn="simplex") for _ in range(repeats)]
            out = outs[0] if repeats == 1 else torch.stack(outs).mean(dim=0)
            (x0 - out).square().cpu()  # detection.py's anomaly map

    diff.forward_backward(ref_net, ref_x[:1], see_whole_sequence=None, t_distance=1, denoise_fn="simplex")  # JIT
    settings = [(t, 1, f"published: simplex noise to t={t}, {t} ancestral DDPM steps, one slice per call")
                for t in args.ref_t]
    if not args.no_matched:
        k = len(default_arch("ddpm")["t_stars"])
        steps = default_arch("ddpm")["ddim_steps"]
        settings.append((steps, k, f"matched evaluations: {k} x (simplex noise to t={steps}, {steps} ancestral "
                                   f"steps), averaged; one slice per call"))
    for t_distance, repeats, label in settings:
        add(f"AnoDDPM reference ({arch_label})", label, t_distance * repeats, params_ref, gflop_ref,
            timed(lambda: reference(t_distance, repeats)), n)

    # ---------------------------------------------------------------- table
    base = rows[0]["seconds_per_volume"]
    load_after = os.getloadavg()
    print(f"\nload average {load_after[0]:.2f} (1 min) at the end; s/volume = {z} slices"
          + (f" (timed {n}, scaled)" if n < z else ""))
    header = ("method", "settings", "evals/slice", "params (M)", "GFLOP/eval", "s/volume", "ratio ref/ours")
    table = [header] + [(r["method"], r["settings"], str(r["evals_per_slice"]), f"{r['parameters'] / 1e6:.2f}",
                         f"{r['gflop_per_eval']:.2f}", f"{r['seconds_per_volume']:.1f}",
                         f"{r['seconds_per_volume'] / base:.1f}x") for r in rows]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in table[1:]:
        print("| " + " | ".join(line) + " |")
    print(f"(ratio: s/volume over ours with all slices in one batch, {base:.1f} s)")
    if args.json:
        meta = {"threads": threads, "cpu_count": os.cpu_count(), "load_average_start": load_before,
                "load_average_end": load_after, "volume_slices": z, "slices_timed": n, "ref_arch": args.ref_arch,
                "reference": {"repository": REPO_URL, "commit": REF_COMMIT, "directory": str(directory)},
                "stand_ins": stubs, "torch": torch.__version__}
        for r in rows:
            r["ratio_to_ours"] = round(r["seconds_per_volume"] / base, 2)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

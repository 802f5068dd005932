#!/usr/bin/env python
"""Seconds per grid volume of the diffusion scorers, the FLOP rate they reach, and how that compares with the
machine's matmul peak.

Every net is built at its default arch (untrained weights: the cost does not depend on them; the ldm gets an
untrained vqvae as its first stage). The volume is the template on the model grid (96 x 112 x 80 voxels at 2 mm,
80 axial slices), standardised as the preprocessing does. One scoring is net.reconstruct + net.score_maps on the
axial slices, all in one batch by default (--batch to split), as the learned scorer does it (bf16 autocast and
channels-last on CUDA); --via-scorer times the LearnedScorer itself instead (slicing and reassembly included, bf16
on CUDA always).

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls, attention) on one eager scoring
of --flop-slices slices and scaled to the volume (every slice costs the same). The peak is the rate of a large square
matmul in the scoring dtype (bf16 with --bf16 on CUDA, else fp32), timed here.

    python scripts/benchmark_diffusion.py                         # CPU, every net, one repeat
    python scripts/benchmark_diffusion.py --nets ldm --threads 2
    python scripts/benchmark_diffusion.py --device cuda --bf16 --compile --repeats 5
    python scripts/benchmark_diffusion.py --slices 16             # time 16 slices, extrapolate to the volume
    python scripts/benchmark_diffusion.py --model ldm-t1-ixi      # a trained model (id or folder): its arch, weights
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.nets import build_net, count_parameters, default_arch  # noqa: E402

NETS = ("ddpm", "pddpm", "cddpm", "ldm")


def grid_volume():
    """(image (80, 112, 96) float32 standardised, brain mask) from the bundled template."""
    import SimpleITK as sitk

    from BrainAnomalyLib.preprocess.normalise import normalise
    from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid

    grid = Grid()
    image = sitk.GetArrayFromImage(template_on_grid(grid)).astype(np.float32) * 1000.0
    mask = brain_mask_on_grid(grid)
    image, _ = normalise(image, mask)
    return image.astype(np.float32), mask


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of repeated square matmuls, large enough to run near the machine's peak."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, started = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 4 == 0:
            sync(device)
            if time.perf_counter() - started > seconds:
                break
    return 2.0 * n ** 3 * count / (time.perf_counter() - started)


def build_trained(name: str):
    """(label, net) of a trained diffusion model: a shipped id, a user model or a model folder."""
    from BrainAnomalyLib.store.models import resolve_model
    from BrainAnomalyLib.scorers import scorer_class

    model = resolve_model(name)
    if model.kind not in NETS:
        raise SystemExit(f"{model.name} is a {model.kind!r} model, not one of the diffusion kinds {', '.join(NETS)}")
    return model.name, scorer_class(model.kind)(model.meta.get("params", {}), model.tensors, "cpu").net()


def build(kind: str, slices: np.ndarray):
    torch.manual_seed(0)
    net = build_net(default_arch(kind))
    if kind == "ldm":
        net.set_first_stage(build_net(net.arch["vqvae"]), slices[::4])
    return net.eval()


def score_once(net, x: torch.Tensor, batch: int, device: str, bf16: bool) -> None:
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.startswith("cuda")):
        for start in range(0, x.shape[0], batch):
            xb = x[start:start + batch]
            recon = net.reconstruct(xb)
            net.score_maps(xb, recon)["signed"].float().cpu()


def count_flops(net, x: torch.Tensor, device: str, bf16: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        score_once(net, x, x.shape[0], device, bf16)
    return float(counter.get_total_flops())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", choices=NETS, help="default archs, untrained (default: all, unless --model)")
    ap.add_argument("--model", action="append", default=[], help="a trained diffusion model (id or folder); repeatable")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only, as the scorer does)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (meant for CUDA)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on CUDA, 0 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="slices per batch (default: all)")
    ap.add_argument("--slices", type=int, default=None,
                    help="time only this many central slices and scale to the whole volume")
    ap.add_argument("--flop-slices", type=int, default=2, help="slices the FLOP count runs on")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--via-scorer", action="store_true", help="time LearnedScorer.score on the volume instead")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.startswith("cuda")
    bf16 = args.bf16 and cuda
    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    image, mask = grid_volume()
    z = image.shape[0]
    from BrainAnomalyLib.learn.slices import volume_slices_for_scoring

    all_slices, _ = volume_slices_for_scoring(image, mask, 0)
    n_timed = min(args.slices or z, z)
    first = (z - n_timed) // 2
    x = torch.from_numpy(np.ascontiguousarray(all_slices[first:first + n_timed])).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = args.batch or n_timed

    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(device, peak_dtype)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device {name}; matmul peak {peak / 1e12:.3f} TFLOP/s ({str(peak_dtype).replace('torch.', '')}); "
          f"volume {tuple(image.shape)}, {'all' if batch >= n_timed else batch} slices per batch"
          + (f"; timing {n_timed} of {z} slices, scaled" if n_timed < z else ""))
    results = []
    nets = args.nets if args.nets or args.model else list(NETS)
    jobs = [lambda kind=kind: (kind, build(kind, all_slices)) for kind in nets or []]
    jobs += [lambda name=name: build_trained(name) for name in args.model]
    for make in jobs:
        label, net = make()
        kind = net.type_name
        params = count_parameters(net)
        net.to(device)
        if cuda:
            net = net.to(memory_format=torch.channels_last)
        k = min(args.flop_slices, n_timed)
        flops = count_flops(net, x[:k], device, bf16) * z / k
        if args.compile:
            net.unet = torch.compile(net.unet)
        if args.via_scorer:
            from BrainAnomalyLib.core.progress import Reporter
            from BrainAnomalyLib.scorers import scorer_class

            tensors = {f"net.{key}": v.detach().cpu().numpy() for key, v in net.state_dict().items()}
            scorer = scorer_class(kind)({"arch": net.arch, "batch_size": batch}, tensors, device)
            if args.compile:
                scorer.net().unet = torch.compile(scorer.net().unet)

            def run():
                scorer.score(image, mask, Reporter())
        else:
            def run():
                score_once(net, x, batch, device, bf16)
        for _ in range(warmup):
            run()
        times = []
        for _ in range(max(1, args.repeats)):
            sync(device)
            started = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - started)
        scale = 1.0 if args.via_scorer else z / n_timed
        seconds = statistics.median(times) * scale
        rate = flops / seconds
        row = {"net": label, "type": kind, "arch": net.arch, "parameters": params,
               "gflop_per_volume": round(flops / 1e9, 2),
               "seconds_per_volume": round(seconds, 3), "achieved_tflops": round(rate / 1e12, 4),
               "peak_tflops": round(peak / 1e12, 3), "fraction_of_peak": round(rate / peak, 4),
               "repeats": len(times), "device": name, "bf16": bf16, "compile": args.compile,
               "via_scorer": args.via_scorer, "slices_timed": z if args.via_scorer else n_timed,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)}
        results.append(row)
        print(f"{label:6s} {params / 1e6:5.2f} M params  {flops / 1e9:8.1f} GFLOP/volume  {seconds:8.2f} s/volume  "
              f"{rate / 1e12:8.4f} TFLOP/s = {100 * rate / peak:5.1f} % of peak", flush=True)
        net = None  # frees it before the next one is built (`run` shares this variable, so no `del`)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

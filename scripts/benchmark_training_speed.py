#!/usr/bin/env python
"""Training speed of the learned models' networks (default archs) in slices per second, with and without bf16
autocast and channels-last memory, on the CPU (or --device cuda).

    python scripts/benchmark_training_speed.py [--models dae,ldm] [--batch 32] [--steps 6] [--rounds 3]

One step is what the training engine does per batch: the net's training losses, backward, AdamW. Random slices of
the grid's size (the speed does not depend on their content). The variants run interleaved, round after round, and
the median round is reported, so that load from other processes on a shared machine spreads over all of them.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from BrainAnomalyLib.nets import build_net, default_arch  # noqa: E402
from BrainAnomalyLib.scorers.learned_fit import first_stage_key  # noqa: E402

VARIANTS = {"fp32": (False, False), "bf16": (True, False), "channels-last": (False, True),
            "bf16+channels-last": (True, True)}


def make_net(kind: str, device: str, x: torch.Tensor):
    arch = default_arch(kind, in_channels=1)
    net = build_net(arch)
    stage = first_stage_key(kind)
    if stage is not None:  # an untrained first stage runs as fast as a trained one
        first = build_net(dict(arch[stage], in_channels=1, size=arch["size"]))
        if hasattr(net, "set_first_stage"):
            net.set_first_stage(first, x.cpu().numpy())
        else:
            net.set_feature_net(first)
    return net.to(device).train()


def step(net, opt, x, m, bf16: bool, device: str) -> None:
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        loss = net.training_losses(x, m)["loss"]
    loss.backward()
    opt.step()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dae,ldm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch {args.batch}"
          + (f", CPU instructions: {torch.backends.cpu.get_cpu_capability()}" if args.device == "cpu" else ""))
    for kind in args.models.split(","):
        size = default_arch(kind, in_channels=1)["size"]
        x = torch.randn(args.batch, 1, *size, device=args.device)
        m = torch.ones(args.batch, 1, *size, dtype=torch.bool, device=args.device)
        runs = {}
        for name, (bf16, cl) in VARIANTS.items():
            net = make_net(kind, args.device, x)
            xv, mv = x, m
            if cl:
                net = net.to(memory_format=torch.channels_last)
                xv = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-4)
            step(net, opt, xv, mv, bf16, args.device)  # warm-up (allocations, kernel choice)
            runs[name] = (net, opt, xv, mv, bf16)
        rates = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, (net, opt, xv, mv, bf16) in runs.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(net, opt, xv, mv, bf16, args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
        base = statistics.median(rates["fp32"])
        for name, r in rates.items():
            med = statistics.median(r)
            print(f"{kind:5s} {name:20s} {med:7.1f} slices/s  (x{med / base:.2f} of fp32; rounds "
                  + ", ".join(f"{v:.1f}" for v in r) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run by Testing/test_learn.py under `torchrun --nproc_per_node=2`: trains the test networks with fit_net exactly as a
single process would, then each rank writes what it ended with (a hash of its weights, its result) to
OUT/rank<r>-<name>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_learn import TinyAE, tiny_slices, weights_hash  # noqa: E402  (the test file's networks and data)

from BrainAnomalyLib.learn.augment2d import Augment2DConfig  # noqa: E402
from BrainAnomalyLib.learn.engine import TrainConfig, fit_net  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    x, m = tiny_slices(56, seed=0)
    train, val = (x[:40], m[:40]), (x[40:], m[40:])
    config = TrainConfig(epochs=3, batch_size=4, lr=5e-3, device="cpu", patience=None,
                         augment=Augment2DConfig(enabled=False), log_every=2)
    for name, net in (("ae", TinyAE()), ("gan", TinyAE(disc=True))):
        torch.manual_seed(1000 + rank)  # different initial weights per rank: DDP must make them the same
        net = type(net)(**net.init_args)
        result = fit_net(net, train, val, config, checkpoint_dir=out / name, write_report=(name == "ae"))
        info = {"hash": weights_hash(net.state_dict()), "world_size": result["world_size"],
                "steps": [e["steps"] for e in result["history"]], "val_loss": result["val_loss"],
                "best_val_loss": result["best_val_loss"], "best_epoch": result["best_epoch"],
                "stop_reason": result["stop_reason"]}
        (out / f"rank{rank}-{name}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

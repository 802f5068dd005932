"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder:

    checkpoint.json        format, the net's arch, the caller's state (epoch, history, ...), each optimiser's
                           param_groups (hyperparameters) and non-tensor state, python and numpy RNG states,
                           and the sha256 of every tensor file
    net.safetensors        the net's state_dict
    optimisers.safetensors optimiser state tensors, keys "<optimiser>/<param index>/<name>" (AdamW: step,
                           exp_avg, exp_avg_sq)
    rng.safetensors        torch's CPU RNG state ("torch", uint8) and CUDA RNG states ("cuda/<i>") when CUDA is in use
    <set>.safetensors      extra named tensor sets (the engine keeps the best weights as "best")

It is written with core/files.staged_folder (built beside the destination and swapped in with renames, the previous
one moved aside first and deleted last), so an interrupted save leaves the previous checkpoint loadable:
`load_checkpoint` falls back to the moved-aside copy if the process was killed between the two renames.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from ..core.errors import ModelError
from ..core.files import interrupted_swap, sha256_file, staged_folder

FORMAT = "brainanomaly-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
NET_FILE = "net.safetensors"
OPTIM_FILE = "optimisers.safetensors"
RNG_FILE = "rng.safetensors"
_RESERVED = {"net", "optimisers", "rng", "checkpoint"}
_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _plain_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> Dict[str, torch.Tensor]:
    """CPU, contiguous copies with no shared storage (safetensors refuses shared tensors)."""
    out = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def _to_json(value, where: str):
    """JSON-safe copy (tuples -> lists); raises on anything JSON cannot hold."""
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, where) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where}: {type(value).__name__} cannot be stored in JSON")


def rng_states() -> tuple[dict, Dict[str, torch.Tensor]]:
    """(JSON part: python and numpy states, tensor part: torch CPU and CUDA states)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [version, list(internal), gauss],
          "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    return js, tensors


def set_rng_states(js: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    if "python" in js:
        version, internal, gauss = js["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in js:
        name, keys, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k].to(torch.uint8) for k in cuda])


def _optimiser_parts(name: str, optimiser: torch.optim.Optimizer):
    sd = optimiser.state_dict()
    tensors: Dict[str, torch.Tensor] = {}
    state_json: Dict[str, dict] = {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{idx}/{key}"] = value
            else:
                state_json.setdefault(str(idx), {})[key] = _to_json(value, f"optimiser {name} state {key}")
    groups = []
    for gi, group in enumerate(sd["param_groups"]):
        g = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"{name}/param_groups/{gi}/{key}"] = value
                g[key] = {"__tensor__": f"{name}/param_groups/{gi}/{key}"}
            else:
                g[key] = _to_json(value, f"optimiser {name} hyperparameter {key}")
        groups.append(g)
    return tensors, {"param_groups": groups, "state": state_json}


def _optimiser_state_dict(meta: dict, tensors: Mapping[str, torch.Tensor], name: str) -> dict:
    state: Dict[int, dict] = {}
    prefix = f"{name}/"
    for key, value in tensors.items():
        if not key.startswith(prefix) or key.startswith(prefix + "param_groups/"):
            continue
        idx, entry = key[len(prefix):].split("/", 1)
        state.setdefault(int(idx), {})[entry] = value
    for idx, entries in meta.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        g = {}
        for key, value in group.items():
            if isinstance(value, dict) and "__tensor__" in value:
                g[key] = tensors[value["__tensor__"]]
            elif isinstance(value, list) and key != "params":
                g[key] = tuple(value)  # JSON has no tuples (betas)
            else:
                g[key] = value
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder, net: torch.nn.Module, optimisers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
                    state: Optional[dict] = None,
                    tensor_sets: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None, rng: bool = True) -> Path:
    """Write a checkpoint folder atomically. `state` must be JSON-serialisable; `tensor_sets` are extra named
    {key: tensor} sets (one safetensors file each); `rng` stores the python/numpy/torch RNG states."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": _to_json(getattr(net, "arch", None), "arch"),
            "state": _to_json(state or {}, "state"), "optimisers": {}, "tensor_sets": [], "files": {}}
    files: Dict[str, Dict[str, torch.Tensor]] = {NET_FILE: _plain_tensors(net.state_dict(), "net state_dict")}
    optim_tensors: Dict[str, torch.Tensor] = {}
    for name, optimiser in (optimisers or {}).items():
        if "/" in name:
            raise ValueError(f"optimiser name {name!r} must not contain '/'")
        t, m = _optimiser_parts(name, optimiser)
        optim_tensors.update(t)
        meta["optimisers"][name] = m
    files[OPTIM_FILE] = _plain_tensors(optim_tensors, "optimiser state")
    if rng:
        js, t = rng_states()
        meta["rng"] = js
        files[RNG_FILE] = _plain_tensors(t, "rng state")
    for name, tensors in (tensor_sets or {}).items():
        if not _SET_NAME.match(name) or name in _RESERVED:
            raise ValueError(f"bad tensor set name {name!r}")
        files[f"{name}.safetensors"] = _plain_tensors(tensors, f"tensor set {name}")
        meta["tensor_sets"].append(name)

    with staged_folder(folder) as stage:
        for fname, tensors in files.items():
            save_file(tensors, str(stage / fname))
            meta["files"][fname] = sha256_file(stage / fname)
        (stage / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return folder


def _readable(folder: Path) -> Optional[Path]:
    """The folder, or the previous checkpoint moved aside by a save that stopped between its two renames."""
    if (folder / META_FILE).is_file():
        return folder
    previous = interrupted_swap(folder)
    return previous if previous is not None and (previous / META_FILE).is_file() else None


def checkpoint_exists(folder) -> bool:
    return _readable(Path(folder)) is not None


def read_checkpoint_meta(folder) -> dict:
    """checkpoint.json, checked (format, file checksums); raises ModelError."""
    folder = Path(folder)
    where = _readable(folder)
    if where is None:
        raise ModelError(f"{folder} holds no checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads((where / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"checkpoint {folder}: unreadable {META_FILE} ({exc})") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"{folder} is not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    for fname, digest in meta.get("files", {}).items():
        path = where / fname
        if not path.is_file() or sha256_file(path) != digest:
            raise ModelError(f"checkpoint {folder}: {fname} is missing or does not match its checksum")
    meta["_path"] = str(where)
    return meta


def _load_file(meta: dict, fname: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if fname not in meta.get("files", {}):
        return {}
    return load_file(str(Path(meta["_path"]) / fname), device="cpu")


def _completed_arch(arch: dict):
    """A saved arch with the hyperparameters added since it was written, at their defaults (which keep the old
    behaviour), so checkpoints of older versions still resume; None if it no longer builds."""
    from ..nets import build_net

    try:
        return build_net(arch).arch
    except (ValueError, KeyError, TypeError):
        return None


def load_checkpoint(folder, net: Optional[torch.nn.Module] = None,
                    optimisers: Optional[Mapping[str, torch.optim.Optimizer]] = None, restore_rng: bool = False,
                    check_arch: bool = True) -> dict:
    """Load weights into `net` and state into `optimisers` (same names as saved); return the saved `state`.
    `restore_rng` also sets the python/numpy/torch RNGs as they were at the save."""
    meta = read_checkpoint_meta(folder)
    if net is not None:
        arch = _to_json(getattr(net, "arch", None), "arch")
        if check_arch and meta.get("arch") is not None and arch is not None and meta["arch"] != arch \
                and _completed_arch(meta["arch"]) != arch:
            raise ModelError(f"checkpoint {folder} was written for another network (arch differs)")
        try:
            net.load_state_dict(_load_file(meta, NET_FILE), strict=True)
        except RuntimeError as exc:
            raise ModelError(f"checkpoint {folder}: weights do not fit the network ({exc})") from None
    if optimisers:
        saved = meta.get("optimisers", {})
        if set(saved) != set(optimisers):
            raise ModelError(f"checkpoint {folder} has optimisers {sorted(saved)}, expected {sorted(optimisers)}")
        tensors = _load_file(meta, OPTIM_FILE)
        for name, optimiser in optimisers.items():
            try:
                optimiser.load_state_dict(_optimiser_state_dict(saved[name], tensors, name))
            except (ValueError, KeyError) as exc:
                raise ModelError(f"checkpoint {folder}: optimiser {name} does not fit ({exc})") from None
    if restore_rng:
        set_rng_states(meta.get("rng", {}), _load_file(meta, RNG_FILE))
    return meta["state"]


def load_tensor_set(folder, name: str) -> Dict[str, torch.Tensor]:
    """An extra tensor set saved with the checkpoint (e.g. "best")."""
    meta = read_checkpoint_meta(folder)
    if name not in meta.get("tensor_sets", []):
        raise ModelError(f"checkpoint {folder} has no tensor set {name!r}")
    return _load_file(meta, f"{name}.safetensors")

"""Crash-safe checkpoints of tensors and plain data only (safetensors + JSON, no pickle).

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding `tensors.safetensors` (model,
optimizer moments, RNG states) and `state.json` (everything else). It is written under a
temporary name and renamed into place, and `state.json` records the sha256 of the tensor file,
so a half-written or corrupted checkpoint is detected and skipped in favour of an older one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fwbw.files import atomic_write, atomic_write_json, atomic_write_text
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import HlbGpt, build_model

CHECKPOINTS = "checkpoints"
TENSORS = "tensors.safetensors"
STATE = "state.json"
KEEP = 2


class CorruptCheckpoint(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flatten(prefix: str, tree, tensors: dict[str, torch.Tensor]):
    """Move every tensor of a nested dict/list into `tensors` (keyed by its path) and return the
    remaining plain structure with {"__tensor__": key} placeholders."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): flatten(f"{prefix}.{k}", v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(tree)]
    return tree


def unflatten(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def _optimizer_keys_to_int(state: dict) -> dict:
    """JSON turns the optimizer's integer parameter ids into strings; turn them back."""
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


def save(run_dir: Path, step: int, payload: dict) -> Path:
    """Write `payload` (nested dicts of tensors and plain data) as the checkpoint of `step`."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f".partial_step_{step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    plain = flatten("root", payload, tensors)
    save_file(tensors, str(partial / TENSORS))
    atomic_write_text(partial / STATE, json.dumps({"step": step, "sha256": _sha256(partial / TENSORS), "payload": plain}))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(root.glob("step_*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / STATE).read_text())
        if _sha256(path / TENSORS) != meta["sha256"]:
            raise CorruptCheckpoint(f"{path}: tensor file does not match its recorded sha256")
        payload = unflatten(meta["payload"], load_file(str(path / TENSORS)))
    except (OSError, ValueError, KeyError) as error:
        raise CorruptCheckpoint(f"{path}: {error}") from error
    if "optimizer" in payload:
        payload["optimizer"] = _optimizer_keys_to_int(payload["optimizer"])
    return payload


def load_latest(run_dir: Path, warn=print) -> dict | None:
    """The newest checkpoint that loads intact, or None; corrupt ones are reported and skipped."""
    for path in sorted((Path(run_dir) / CHECKPOINTS).glob("step_*"), reverse=True):
        try:
            return load(path)
        except CorruptCheckpoint as error:
            warn(f"skipping corrupt checkpoint: {error}")
    return None


def save_model(run_dir: Path, model: HlbGpt) -> None:
    """The trained weights and their shape, for `load_model` (cut, analysis, sampling)."""
    run_dir = Path(run_dir)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_json(run_dir / "model_config.json", dataclasses.asdict(model.config))
    atomic_write(run_dir / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))


def load_model(run_dir: Path, device: str = "cpu") -> HlbGpt:
    run_dir = Path(run_dir)
    model = build_model(ModelConfig(**json.loads((run_dir / "model_config.json").read_text())))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.to(device)

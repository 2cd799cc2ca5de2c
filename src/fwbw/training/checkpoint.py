"""Crash-safe checkpoints of tensors and plain data only (safetensors + JSON, no pickle).

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding `tensors.safetensors` (model,
optimizer moments, RNG states) and `state.json` (everything else). It is written under a
temporary name and renamed into place, and `state.json` records the sha256 of the tensor file,
so a half-written or corrupted checkpoint is detected and skipped in favour of an older one.
`state.json` also records the id of the config it was trained with (run_dir.config_id): a
checkpoint is only ever resumed into that config; and the epoch of the lease it was written under
(None without one). Every write into a run directory is fenced (run_dir.check_fence): a worker
that lost the run's lease writes no checkpoint, model or weights.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fwbw.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cannot_write,
    read_json,
    sha256_of,
)
from fwbw.model.config import ModelConfig
from fwbw.model.hlb_gpt import HlbGpt, build_model
from fwbw.training.run_dir import CHECKPOINTS, MODEL_CONFIG, MODEL_WEIGHTS, check_fence

TENSORS = "tensors.safetensors"
STATE = "state.json"
KEEP = 2


ON_DEVICE = ("model", "optimizer", "average")  # the parts a resumed run uses on its device


class CorruptCheckpoint(RuntimeError):
    pass


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


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, whose own error (disk full included) becomes one line naming the file."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as error:
        raise cannot_write(path, error) from error


def save(run_dir: Path, step: int, payload: dict, config_id: str) -> Path:
    """Write `payload` (nested dicts of tensors and plain data) as the checkpoint of `step` of the
    config `config_id`; keep the newest KEEP checkpoints of that config and remove the rest.
    LeaseLost before anything is written, and again before it is put in place, once this process's
    lease on the run is lost (a newer holder may be writing the same step)."""
    check_fence(run_dir)
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f".partial_step_{step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        plain = flatten("root", payload, tensors)
        _save_tensors(tensors, partial / TENSORS)
        state = {"step": step, "config": config_id, "lease_epoch": check_fence(run_dir),
                 "sha256": sha256_of(partial / TENSORS), "payload": plain}
        atomic_write_text(partial / STATE, json.dumps(state))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    own = [path for path in sorted(root.glob("step_*")) if _config_of(path) == config_id]
    for old in set(root.glob("step_*")) - set(own[-KEEP:]):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_state(path: Path) -> dict:
    try:
        state = read_json(path / STATE)
    except (OSError, ValueError) as error:
        raise CorruptCheckpoint(str(error)) from error
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path / STATE}: not a checkpoint state")
    return state


def _config_of(path: Path) -> str | None:
    """The config id a checkpoint was written for (None when unreadable or not recorded)."""
    try:
        return _read_state(path).get("config")
    except CorruptCheckpoint:
        return None


def load(path: Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's payload, the tensors of ON_DEVICE's parts on `device`."""
    path = Path(path)
    meta = _read_state(path)
    try:
        if sha256_of(path / TENSORS) != meta["sha256"]:
            raise CorruptCheckpoint(f"{path}: tensor file does not match its recorded sha256")
        payload = unflatten(meta["payload"], _read_tensors(path / TENSORS, device))
    except (OSError, ValueError, KeyError, IndexError, SafetensorError) as error:
        raise CorruptCheckpoint(f"{path}: {error}") from error
    if "optimizer" in payload:
        payload["optimizer"] = _optimizer_keys_to_int(payload["optimizer"])
    return payload


def _read_tensors(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors, those of ON_DEVICE's parts moved to `device` one at a time (a rank never
    holds a whole CPU copy of them); the rest, generator states and kept weights, on the CPU."""
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        return {key: _placed(key, handle.get_tensor(key), device) for key in handle.keys()}


def _placed(key: str, tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    part = key.split(".")[1]  # keys are root.<part>.<path> (save's flatten)
    return tensor.to(device) if part in ON_DEVICE else tensor


def load_latest(run_dir: Path, config_id: str, keys: tuple[str, ...] = (), warn=print,
                device: str | torch.device = "cpu") -> dict | None:
    """The newest checkpoint of the config `config_id` that loads intact and holds every key of
    `keys` (on `device`: load), or None; corrupt ones, those of another config and those without
    the keys (written by another version) are reported and skipped."""
    for path in sorted((Path(run_dir) / CHECKPOINTS).glob("step_*"), reverse=True):
        try:
            if _read_state(path).get("config") != config_id:
                warn(f"skipping checkpoint {path}: it was written for another config")
                continue
            payload = load(path, device)
        except CorruptCheckpoint as error:
            warn(f"skipping corrupt checkpoint: {error}")
            continue
        missing = [key for key in keys if key not in payload]
        if missing:
            warn(f"skipping checkpoint {path}: it has no {', '.join(missing)} (written by another version)")
            continue
        return payload
    return None


def save_model(run_dir: Path, model: HlbGpt) -> None:
    """The trained weights and their shape, for `load_model` (cut, analysis, sampling)."""
    run_dir = Path(run_dir)
    check_fence(run_dir)
    atomic_write_json(run_dir / MODEL_CONFIG, dataclasses.asdict(model.config))
    save_weights(run_dir / MODEL_WEIGHTS, model.state_dict())


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """A state dict as safetensors (e.g. the weights early stopping selected)."""
    check_fence(Path(path).parent)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
    atomic_write(Path(path), lambda tmp: _save_tensors(tensors, tmp))


def load_weights(run_dir: Path, model: HlbGpt) -> HlbGpt:
    """Load the run's trained weights into `model`, a model of the run's shape."""
    model.load_state_dict(load_file(str(Path(run_dir) / MODEL_WEIGHTS)))
    return model


def load_model(run_dir: Path, device: str = "cpu") -> HlbGpt:
    model = build_model(ModelConfig(**read_json(Path(run_dir) / MODEL_CONFIG)))
    return load_weights(run_dir, model).to(device)

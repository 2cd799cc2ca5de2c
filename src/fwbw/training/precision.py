"""Where and in which precision the model runs."""

from __future__ import annotations

import contextlib

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *TORCH_DTYPES)  # "auto": see resolve_dtype


def resolve_device(name: str, index: int = 0) -> torch.device:
    """cpu, or the CUDA device `index` (a data-parallel rank's local rank); auto: CUDA if any."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was requested but no CUDA device is available")
    return torch.device("cuda", index) if name == "cuda" else torch.device(name)


def resolve_dtype(name: str) -> str:
    """'auto' picks bf16 autocast: on CUDA and on AMX CPUs it runs matmuls several times faster
    than fp32 (see `fwbw bench`); weights and optimizer state stay fp32 either way."""
    return "bf16" if name == "auto" else name


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])

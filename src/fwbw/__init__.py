"""fwbw: forward and leak-free backward causal-mask training of hlb-gpt.

The public API is imported lazily, so importing a light module (fwbw.files, fwbw.schema) does not
import torch."""

__all__ = ["ModelConfig", "build_model"]


def __getattr__(name: str):
    if name == "ModelConfig":
        from fwbw.model.config import ModelConfig

        return ModelConfig
    if name == "build_model":
        from fwbw.model.hlb_gpt import build_model

        return build_model
    raise AttributeError(f"module 'fwbw' has no attribute {name!r}")

from fwbw.model import ModelConfig, build_model

__all__ = ["ModelConfig", "build_model"]

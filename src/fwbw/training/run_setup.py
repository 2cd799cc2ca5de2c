"""What a run is made of before its first step, shared by training and by `fwbw cut`: its data,
device, precision, freshly initialised model and fixed validation (and training-subset) windows."""

from __future__ import annotations

import contextlib

import torch

from fwbw.data.corpora import TokenData, load_token_data
from fwbw.data.windows import train_eval_set, validation_set
from fwbw.model.hlb_gpt import build_model
from fwbw.training.config import TrainConfig
from fwbw.training.data_parallel import SINGLE_PROCESS, DataParallel
from fwbw.training.precision import autocast, resolve_device, resolve_dtype


class RunSetup:
    """A config's data (loaded unless given), device, dtype, model (seeded with config.seed) and
    validation windows, in one rank of `parallel` (its device: the rank's GPU on CUDA)."""

    def __init__(
        self, config: TrainConfig, data: TokenData | None = None, progress: bool = True,
        parallel: DataParallel = SINGLE_PROCESS,
    ):
        self.config = config
        self.parallel = parallel
        self.data = data or self._load_data(progress)
        self.device = resolve_device(config.device, parallel.local_rank)
        self.dtype = resolve_dtype(config.dtype)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model_config(self.data.vocab_size)).to(self.device)
        self.valid = validation_set(config, self.data.valid)
        self.train_eval = train_eval_set(config, self.data.train)

    def _load_data(self, progress: bool) -> TokenData:
        """Rank 0 downloads and tokenizes (into the cache) before the other ranks read it."""
        first = self.parallel.is_main
        data = self._load_tokens(progress) if first else None
        self.parallel.barrier()
        return data if first else self._load_tokens(progress=False)

    def _load_tokens(self, progress: bool) -> TokenData:
        config = self.config
        return load_token_data(config.data, config.tokenizer, progress=progress, train_fraction=config.train_fraction,
                               subset_seed=config.subset_seed)

    def precision(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

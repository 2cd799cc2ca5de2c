"""Started by torchrun from test_data_parallel: trains the run of a TrainConfig file into
OUT/run and writes OUT/rank<R>.json with what this rank trained at each step (its windows and
tasks, from every task_stats call made with gradients) and the loss train_step returned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import fwbw.training.data_parallel as data_parallel
import fwbw.training.trainer as trainer_module
from fwbw.training.config import TrainConfig
from fwbw.training.data_parallel import leave

data_parallel.BUCKET_ELEMENTS = 1000  # many buckets: each block's matrices in one of their own


class RecordingTrainer(trainer_module.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[dict] = []
        self.losses: list[float] = []

    def train_step(self, directions=None):
        loss = super().train_step(directions)
        self.losses.append(loss)
        return loss


def main(config_file: str, out: str) -> None:
    out_dir = Path(out)
    trainer = RecordingTrainer(TrainConfig.load(Path(config_file)), out_dir / "run", progress=False)
    original = trainer_module.task_stats

    def recording_task_stats(model, windows, directions, accuracy=True, counted_windows=None):
        if torch.is_grad_enabled():
            trainer.calls.append({"step": trainer.state.step, "windows": windows.tolist(), "directions": list(directions)})
        return original(model, windows, directions, accuracy, counted_windows)

    trainer_module.task_stats = recording_task_stats
    trainer.run()
    record = {"world_size": trainer.parallel.world_size, "calls": trainer.calls, "losses": trainer.losses}
    (out_dir / f"rank{trainer.parallel.rank}.json").write_text(json.dumps(record))
    leave()


if __name__ == "__main__":
    main(*sys.argv[1:])

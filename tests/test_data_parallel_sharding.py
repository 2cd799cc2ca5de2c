"""How the ranks of a data-parallel run share a step's microbatches (whole ones dealt out, only
those left over split by rows), that the result is one process's gradient, and that a rank
leaves no process-group thread running when its interpreter exits."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, subprocess_env, tiny_config
from test_data_parallel import (
    LOSS_TOLERANCE,
    RECIPE,
    assert_metrics_match_one_process,
    dp_config,
    rank_parts,
    recorded_run,
    steps_of,
    torchrun,
)

import fwbw.training.trainer as trainer_module
from fwbw.model.tasks import window_length
from fwbw.training.config import RecipeConfig
from fwbw.training.data_parallel import SINGLE_PROCESS, DataParallel
from fwbw.training.trainer import TOKENIZE_LOCK, Trainer

pytestmark = pytest.mark.usefixtures("cache_env", "one_thread")


def parts_of(parallel: DataParallel, batches: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    count = len(batches)
    return {index: parallel.part(index, count, batches[index]) for index in parallel.microbatches(count)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_ranks_deal_out_whole_microbatches_and_split_only_those_left_over(world_size):
    ranks = [DataParallel(rank=rank, world_size=world_size) for rank in range(world_size)]
    for count in range(1, 3 * world_size + 2):
        for rows in range(world_size, world_size + 4):
            batches = [torch.arange(rows) + 100 * index for index in range(count)]
            parts = [parts_of(parallel, batches) for parallel in ranks]
            whole = count - count % world_size
            for index, batch in enumerate(batches):
                holders = [rank for rank in range(world_size) if index in parts[rank]]
                if index < whole:  # microbatch i to rank i mod W, whole
                    assert holders == [index % world_size] and torch.equal(parts[index % world_size][index], batch)
                else:  # contiguous shares, in rank order, that make up the microbatch
                    assert holders == list(range(world_size))
                    assert torch.equal(torch.cat([parts[rank][index] for rank in holders]), batch)
            assert all(list(part) == sorted(part) for part in parts)  # each rank in the one-process order
            loads = [sum(map(len, part.values())) for part in parts]
            assert max(loads) - min(loads) <= count - whole  # at most a row more of each one left over
            largest = max(len(part_rows) for part in parts for part_rows in part.values())
            assert ranks[0].largest_part(count, rows) == largest


def gradients_and_loss_sums(trainer: Trainer, parallel: DataParallel, batches, replayed) -> tuple[list, torch.Tensor]:
    trainer.parallel = parallel
    trainer.optimizer.zero_grad(set_to_none=True)
    loss_sums = trainer._accumulate(batches, ("fw", "bw"), replayed)
    return [p.grad.clone() for p in trainer.model.parameters()], loss_sums


@pytest.mark.parametrize("microbatches", [1, 2, 3, 4, 5, 7])
def test_three_ranks_gradients_and_loss_sums_add_up_to_one_process(tmp_path, tiny_data, microbatches):
    """Each piece's loss weighted by its share of its microbatch and by 1 / M: summed over the
    ranks, the gradient and the loss sums are one process's, whichever microbatches are whole."""
    trainer = Trainer(tiny_config(), tmp_path / "run", data=tiny_data, progress=False)
    length = window_length(32, trainer.config.task_tokens)  # 16 windows of seq_len 32 a microbatch
    batches, replayed = ([trainer.sampler.sample(16, length) for _ in range(microbatches)] for _ in range(2))
    single_grads, single_sums = gradients_and_loss_sums(trainer, SINGLE_PROCESS, batches, replayed)
    ranks = [gradients_and_loss_sums(trainer, DataParallel(rank, 3), batches, replayed) for rank in range(3)]
    for index, single in enumerate(single_grads):  # float reassociation only: ~1e-7 of the largest element
        summed = sum(grads[index] for grads, _ in ranks)
        torch.testing.assert_close(summed, single, rtol=1e-5, atol=1e-6 * single.abs().max().item())
    assert sum(loss_sums for _, loss_sums in ranks).tolist() == pytest.approx(single_sums.tolist(), rel=1e-6)


@pytest.mark.slow
def test_three_ranks_with_microbatches_left_over_train_the_one_process_run(corpus, tmp_path):
    """Steps of 1, 4 and 5 microbatches on 3 ranks: all split, 3 whole + 1 split, 3 whole + 2 split."""
    config = dp_config(corpus, train_tokens=8000, recipe=RecipeConfig(**{**RECIPE, "accum_max": 5.0}))
    (single,) = recorded_run(corpus, tmp_path, 1, config)
    ranks = recorded_run(corpus, tmp_path, 3, config)
    one, *parts = (steps_of(record["calls"]) for record in (single, *ranks))
    counts = {len(calls) for calls in one.values()}
    assert any(count < 3 for count in counts) and any(count > 3 and count % 3 for count in counts), counts
    for step, calls in one.items():
        assert [part[step] for part in parts] == rank_parts(calls, 3), f"step {step}: the ranks' parts are not the batch"
    assert ranks[0]["losses"] == ranks[1]["losses"] == ranks[2]["losses"]
    differences = [abs(a - b) for a, b in zip(single["losses"], ranks[0]["losses"])]
    assert len(differences) == len(one) and max(differences) < LOSS_TOLERANCE
    assert_metrics_match_one_process(tmp_path, 3)


def test_a_rank_loads_its_tokens_before_it_joins_the_others(corpus, tmp_path, monkeypatch):
    """So a slow download or tokenization cannot run into the collective timeout of the others."""
    order: list[str] = []
    load, join = trainer_module.load_token_data, trainer_module.from_environment
    monkeypatch.setattr(trainer_module, "load_token_data", lambda *args, **kw: order.append("load") or load(*args, **kw))
    monkeypatch.setattr(trainer_module, "from_environment", lambda device_type: order.append("join") or join(device_type))
    Trainer(dp_config(corpus), tmp_path / "run", progress=False)
    assert order == ["load", "join"]
    assert (corpus.cache / TOKENIZE_LOCK).is_file()


# a rank that joins, reduces, builds an optimizer (torch.optim imports torch._dynamo, which imports
# torch.distributed.nn, as when the trainer builds its own) and leaves, or fails; it prints the
# threads it has left, once the process group's exit handler has run (atexit: last in, first out),
# into OUT/rank<R>.txt
EXITING_RANK = """
import atexit, os, sys
import torch

def report():
    names = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
    with open(os.path.join(sys.argv[2], "rank" + os.environ["RANK"] + ".txt"), "w") as out:
        out.write(" ".join(names))

atexit.register(report)
from fwbw.training import data_parallel

parallel = data_parallel.from_environment("cpu")
parallel.all_reduce_sum(torch.ones(2))
torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
if sys.argv[1] == "fail":
    sys.exit(3)
data_parallel.leave()
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["leave", "fail"])
def test_no_process_group_thread_outlives_a_rank(tmp_path, ending):
    """A gloo thread still running while the interpreter finalizes can abort the rank ("terminate
    called without an active exception", exit code -6), even after its run succeeded."""
    script = tmp_path / "rank.py"
    script.write_text(EXITING_RANK)
    done = subprocess.run(torchrun(2, str(script), ending, str(tmp_path)), capture_output=True, text=True,
                          env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT)
    assert (done.returncode == 0) == (ending == "leave"), done.stderr[-3000:]
    threads = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in range(2)]
    assert not [name for names in threads for name in names if "gloo" in name], threads
    assert "terminate called" not in done.stderr

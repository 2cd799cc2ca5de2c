#!/usr/bin/env bash
# The GPU check: on one CUDA machine, in under 8 minutes, prints ONE JSON line of figures:
#   sizes     the paper preset's smallest and largest model sizes (GPT-2's vocabulary, random tokens,
#             the study's tokens per microbatch, bf16, compiled): the MFU of fwbw bench's timed steps
#             (fw and fw+bw), then STEPS training steps (tokens/s) and the memory estimate
#             (fwbw.training.memory) against the peak torch measured
#   torchrun  `fwbw train --compile` on the embedded data, 1 process under torchrun
# fwbw bench --shape knows only its standard shapes: the paper's are timed with its Python API.
# Without CUDA a CPU fallback (tiny sizes, a few steps, not compiled) says {"device": "cpu", "fallback": true, ...}.
# Progress goes to stderr. PYTHON: the interpreter (.venv/bin/python); FWBW_CACHE: the token cache.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    device=cuda steps=200 compile=--compile
    run_size=(--depth 4 --width 192 --seq-len 1024 --train-tokens 1000000)
else
    device=cpu steps=3 compile=--no-compile
    run_size=(--depth 1 --width 32 --seq-len 64 --train-tokens 4096 --tokens-per-microbatch 1024 --eval-tokens 1024)
fi

echo "gpu-check: fwbw train under torchrun (1 process, $device)" >&2
"$python" -m torch.distributed.run --standalone --nproc_per_node 1 -m fwbw train --data wiki-sample \
    --tokenizer bpe:1024 "${run_size[@]}" --device "$device" "$compile" --no-progress --out "$work/torchrun" >&2

"$python" - "$device" "$steps" "$work" "$start" <<'PY'
import gc
import json
import sys
import time
from pathlib import Path

import torch

from fwbw.data.tokenizer import vocab_size_of
from fwbw.study.presets import preset_values
from fwbw.study.sweep import study_tokens_per_microbatch
from fwbw.training.bench import BenchShape, bench_shape, bench_trainer, datasheet_peak_gflops, peak_matmul_gflops
from fwbw.training.config import TrainConfig
from fwbw.training.memory import estimate_memory

device, steps, work, start = torch.device(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
cuda = device.type == "cuda"


def paper_shapes() -> list[BenchShape]:
    """The paper preset's smallest and largest sizes, each with the study's tokens per microbatch."""
    paper = preset_values("paper")
    vocab, seq_len = vocab_size_of(paper["tokenizer"]), paper["seq_len"]
    shapes = []
    for name, pick in (("paper-smallest", min), ("paper-largest", max)):
        depth, width = pick(paper["depths"]), pick(paper["widths"])
        params = TrainConfig(depth=depth, width=width, seq_len=seq_len, tokenizer=paper["tokenizer"]).num_params()
        shapes.append(BenchShape(name, width, depth, vocab, seq_len, study_tokens_per_microbatch(params)))
    return shapes


def train(shape: BenchShape) -> dict:
    """`steps` training steps of the shape after an untimed one (compilation): tokens/s, and the
    memory estimate against the peak measured (CUDA only; above what was allocated before)."""
    gc.collect()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    trainer = bench_trainer(shape, shape.batch(device), device.type, "bf16", work / shape.name, compile=cuda)
    trainer.train_step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    began, tokens = time.perf_counter(), trainer.state.tokens
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize(device)
    tokens_per_s = (trainer.state.tokens - tokens) / (time.perf_counter() - began)
    estimate = estimate_memory(trainer.config, shape.vocab).total
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return {"train_steps": steps, "train_tokens_per_s": tokens_per_s, "memory_estimate_bytes": estimate,
            "memory_peak_bytes": peak, "peak_over_estimate": None if peak is None else peak / estimate}


shapes = paper_shapes() if cuda else [BenchShape("cpu-smallest", 32, 1, 512, 64, 256),
                                      BenchShape("cpu-largest", 64, 2, 512, 64, 512)]
peak = peak_matmul_gflops(device, "bf16", None if cuda else 256)
device_name = torch.cuda.get_device_name(device) if cuda else None
datasheet = datasheet_peak_gflops(device_name)
BENCH_KEYS = ("name", "depth", "width", "params", "batch", "compiled", "mfu_fw", "mfu_fwbw", "mfu_fw_datasheet",
              "fw_tokens_per_s", "fwbw_tokens_per_s")
sizes = []
for shape in shapes:
    row = bench_shape(shape, device, "bf16", peak, steps=6, warmup=2, progress=True, datasheet_gflops=datasheet,
                      compile=cuda)
    print(f"gpu-check: {steps} training steps of {shape.name}", file=sys.stderr)
    sizes.append({key: row[key] for key in BENCH_KEYS} | train(shape))
run = json.loads((work / "torchrun" / "summary.json").read_text())
print(json.dumps({
    "device": device.type, "fallback": not cuda, "device_name": device_name, "torch": torch.__version__,
    "peak_bf16_gflops": peak, "datasheet_peak_gflops": datasheet, "sizes": sizes,
    "torchrun": {key: run[key] for key in ("world_size", "compiled", "steps", "mean_train_tokens_per_s")},
    "seconds": time.time() - start,
}))
PY

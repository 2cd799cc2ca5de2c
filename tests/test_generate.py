"""Continuing a text forwards and backwards (fwbw.model.generate)."""

from __future__ import annotations

import pytest
import torch

from fwbw.model.config import ModelConfig
from fwbw.model.generate import continue_tokens
from fwbw.model.hlb_gpt import build_model
from fwbw.model.tasks import task_hidden

VOCAB = 8
MARKER_CHOICE = 7  # what the successor model predicts after a task token


def successor(token: int) -> int:
    return (3 * token + 1) % VOCAB


def successor_model(task_tokens: bool, max_seq_len: int = 6):
    """A model whose logits at a position depend only on that position's token: every block adds
    zero (project = 0), the embedding is one-hot and the output row of successor(i) reads
    dimension i, so text token i predicts successor(i) and a task token predicts MARKER_CHOICE.
    fw reads the last position and bw the first, so the two directions iterate the rule from
    opposite ends of the text."""
    config = ModelConfig(vocab_size=VOCAB, depth=2, width=16, max_seq_len=max_seq_len, task_tokens=task_tokens)
    model = build_model(config)
    with torch.no_grad():
        for block in model.blocks:
            block.project.zero_()
        model.embedding.weight.copy_(torch.eye(config.total_vocab, config.width))
        model.output.weight.zero_()
        for token in range(VOCAB):
            model.output.weight[successor(token), token] = 1.0
        model.output.weight[MARKER_CHOICE, VOCAB:] = 1.0  # the task tokens' dimensions
    return model


def iterate(token: int, steps: int) -> list[int]:
    chain = []
    for _ in range(steps):
        token = successor(token)
        chain.append(token)
    return chain


@pytest.mark.parametrize("task_tokens", [False, True])
def test_successor_model_continues_from_the_right_end(task_tokens):
    model = successor_model(task_tokens)
    assert iterate(2, 4) == [7, 6, 3, 2]
    assert continue_tokens(model, [5, 2], "fw", 4) == [7, 6, 3, 2]  # 2 -> 7 -> 6 -> 3 -> 2
    # bw prepends successor(first token): 5 -> 0 -> 1 -> 4 -> 5, read left to right reversed
    assert continue_tokens(model, [5, 2], "bw", 4) == [5, 4, 1, 0]
    assert continue_tokens(model, [5, 2], "fw", 0) == []


def test_a_misplaced_task_token_would_show():
    """With the marker on the wrong side, the read position holds the marker: MARKER_CHOICE."""
    model = successor_model(task_tokens=True)
    config = model.config
    wrong_fw = model(torch.tensor([[5, 2, config.fw_token_id]]), "fw")[0, -1, :VOCAB].argmax()
    wrong_bw = model(torch.tensor([[config.bw_token_id, 5, 2]]), "bw")[0, 0, :VOCAB].argmax()
    assert int(wrong_fw) == int(wrong_bw) == MARKER_CHOICE
    assert continue_tokens(model, [2, 5], "fw", 1) == [0]
    assert continue_tokens(model, [5, 2], "bw", 1) == [0]


def random_model(task_tokens: bool, max_seq_len: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=VOCAB, depth=2, width=16, max_seq_len=max_seq_len, task_tokens=task_tokens)
    model = build_model(config)
    with torch.no_grad():  # sharper logits than at initialisation: fewer near-ties in argmax
        model.output.weight.mul_(20)
    return model.eval()


def training_path_greedy(model, prompt: list[int], direction: str, new_tokens: int) -> list[int]:
    """Greedy continuation computed through the training code: the window holds the prompt and a
    placeholder where the next token goes, and task_hidden (the batched, flipped pass for causal
    bw) gives the hidden state whose target is that placeholder."""
    config = model.config
    room = config.max_seq_len - (1 if config.task_tokens else 0)
    text = list(prompt)
    for _ in range(new_tokens):
        context = text[-room:] if direction == "fw" else text[:room]
        window = context + [0] if direction == "fw" else [0] + context
        hidden, _ = task_hidden(model, torch.tensor([window]), (direction,))[direction]
        # fw targets end at the placeholder; causal bw comes in reversed order, placeholder last
        logits = model.output(hidden[0, -1])[:VOCAB]
        token = int(logits.argmax())
        text = text + [token] if direction == "fw" else [token] + text
    return text[len(prompt):] if direction == "fw" else text[:new_tokens]


@pytest.mark.parametrize("task_tokens", [False, True])
@pytest.mark.parametrize("direction", ["fw", "bw"])
def test_greedy_matches_the_training_tasks_step_by_step(task_tokens, direction):
    model = random_model(task_tokens)
    prompt = [1, 6, 3, 3, 0]
    got = continue_tokens(model, prompt, direction, 12)  # runs past max_seq_len = 8
    assert got == training_path_greedy(model, prompt, direction, 12)
    assert len(got) == 12 and all(0 <= token < VOCAB for token in got)


def test_bw_continuation_is_the_flipped_fw_continuation():
    """Causal bw over x is fw over reversed x, so continuing x backwards is continuing reversed x
    forwards, reversed (also past max_seq_len, where each keeps its own end of the text)."""
    model = random_model(task_tokens=False)
    prompt = [4, 1, 1, 7, 2, 6, 0, 5, 3, 2]  # longer than max_seq_len = 8
    bw = continue_tokens(model, prompt, "bw", 10)
    assert bw == continue_tokens(model, prompt[::-1], "fw", 10)[::-1]
    assert bw != continue_tokens(model, prompt, "fw", 10)[::-1]


def test_only_the_last_max_seq_len_tokens_are_context():
    model = random_model(task_tokens=True)  # room for 7 text tokens next to the marker
    prompt = [4, 1, 1, 7, 2, 6, 0, 5, 3, 2]
    assert continue_tokens(model, prompt, "fw", 5) == continue_tokens(model, prompt[-7:], "fw", 5)
    assert continue_tokens(model, prompt, "bw", 5) == continue_tokens(model, prompt[:7], "bw", 5)


@pytest.mark.parametrize("task_tokens", [False, True])
def test_the_model_sees_max_seq_len_tokens_with_the_marker_where_training_puts_it(task_tokens):
    model = random_model(task_tokens)  # max_seq_len = 8
    prompt = [4, 1, 1, 7, 2, 6, 0, 5, 3, 2]
    seen: list[list[int]] = []
    model.embedding.register_forward_pre_hook(lambda _, args: seen.append(args[0][0].tolist()))
    fw = continue_tokens(model, prompt, "fw", 2)
    bw = continue_tokens(model, prompt, "bw", 2)
    config = model.config
    if task_tokens:
        assert seen == [
            [config.fw_token_id, *prompt[-7:]], [config.fw_token_id, *prompt[-6:], fw[0]],
            [*prompt[:7], config.bw_token_id], [bw[1], *prompt[:6], config.bw_token_id],
        ]
    else:
        assert seen == [prompt[-8:], [*prompt[-7:], fw[0]], prompt[:8], [bw[1], *prompt[:7]]]


def test_sampling_is_seeded_and_tends_to_greedy_when_cold():
    model = random_model(task_tokens=False)
    prompt = [1, 6, 3]

    def sample(seed: int, temperature: float, direction: str = "fw") -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return continue_tokens(model, prompt, direction, 16, temperature, generator)

    assert sample(0, 1.0) == sample(0, 1.0)
    assert sample(0, 1.0) != sample(1, 1.0)
    assert sample(0, 1e-6) == continue_tokens(model, prompt, "fw", 16)
    assert sample(3, 1e-6, "bw") == continue_tokens(model, prompt, "bw", 16)


def test_training_mode_is_restored():
    model = random_model(task_tokens=False).train()
    continue_tokens(model, [1], "fw", 2)
    assert model.training


def test_the_leaking_bw_mask_is_refused():
    config = ModelConfig(vocab_size=VOCAB, depth=1, width=16, max_seq_len=8, bw_mask="legacy-flip")
    model = build_model(config)
    with pytest.raises(ValueError, match="bw mask 'legacy-flip' reads its own labels"):
        continue_tokens(model, [1, 2], "bw", 3)
    assert len(continue_tokens(model, [1, 2], "fw", 3)) == 3  # its fw task is an ordinary one


@pytest.mark.parametrize(
    "prompt, direction, new_tokens, temperature, message",
    [
        ([], "fw", 1, 0.0, "at least one token"),
        ([1, VOCAB], "fw", 1, 0.0, r"every id must be in \[0, 8\)"),
        ([1], "up", 1, 0.0, "direction"),
        ([1], "fw", -1, 0.0, "new_tokens"),
        ([1], "fw", 1, -0.5, "temperature"),
        ([1], "fw", 1, float("nan"), "temperature"),
    ],
)
def test_bad_requests_are_one_line_errors(prompt, direction, new_tokens, temperature, message):
    with pytest.raises(ValueError, match=message):
        continue_tokens(random_model(task_tokens=True), prompt, direction, new_tokens, temperature)

"""The hlb-gpt v0.4.1 model (docs/method.md#the-model): flip identity, truncation, heads, dropout,
shapes, init, config checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwbw.schema
from fwbw import ModelConfig, build_model
from fwbw.model.hlb_gpt import count_params, residual_dropout
from fwbw.model.masks import mask_and_distance
from fwbw.training.checkpoint import load_model, save_model
from fwbw.training.config import TrainConfig
from fwbw.training.run_dir import MODEL_CONFIG

VOCAB = 50
MAX_LEN = 33
LENGTHS = (1, 2, 7, 16, 33)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, depth=3, width=32, max_seq_len=MAX_LEN)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def randomize_position_bias(model, seed: int, low: float = -3.0, high: float = 3.0) -> list[float]:
    """Distinct position_bias_mult per block, as training would leave them."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(len(model.blocks)).uniform_(low, high, generator=generator).tolist()
    with torch.no_grad():
        for block, value in zip(model.blocks, values):
            block.position_bias_mult.fill_(value)
    assert len(set(values)) == len(values)
    return values


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1000 + length)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def manual_forward(model, tokens: torch.Tensor, direction: str, num_blocks: int, block_forward=None) -> torch.Tensor:
    """embedding -> first num_blocks blocks (each through `block_forward(block, x, allowed, dist)`
    if given) -> final norm -> output, spelled out."""
    config = model.config
    allowed, dist = mask_and_distance(tokens.shape[1], direction, config.bw_mask, max_seq_len=config.max_seq_len)
    x = model.embedding(tokens)
    for block in list(model.blocks)[:num_blocks]:
        x = block_forward(block, x, allowed, dist) if block_forward else block(x, allowed, dist)
    return model.output(model.norm(x))


def per_head_block(block, x: torch.Tensor, allowed: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """LatentAttentionBlock.forward spelled out (eval mode): x plus its residual branch."""
    return x + per_head_branch(block, x, allowed, dist)


def per_head_branch(block, x: torch.Tensor, allowed: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """A block's residual branch, attention run head by head as hlb-gpt's single head: SDPA on
    [B, T, channels] slices of q, k (qk / h each) and the value (width / h each)."""
    bias = torch.where(allowed, F.softplus(block.position_bias_mult) * dist, float("-inf"))
    qk, expand = block.qk_dim, block.expand_dim
    query, key, linear, pre_gelu = F.linear(block.norm(x), block.expand).split((qk, qk, expand, expand), dim=-1)
    geglu = linear * F.gelu(pre_gelu)
    local, value = geglu[..., : expand - block.value_dim], geglu[..., expand - block.value_dim :]
    heads = block.num_heads
    outputs = [
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        for q, k, v in zip(query.chunk(heads, dim=-1), key.chunk(heads, dim=-1), value.chunk(heads, dim=-1))
    ]
    return F.linear(torch.cat([local, *outputs], dim=-1), block.project)


# ---------------------------------------------------------------------------------------------
# 5. flip identity: bw over x == fw over reversed x, reversed back
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_bw_equals_fw_on_reversed_input_at_init(task_tokens):
    model = tiny_model(seed=1, task_tokens=task_tokens)
    for length in LENGTHS:
        tokens = random_tokens(3, length, model.config.total_vocab, seed=1)
        with torch.no_grad():
            bw = model(tokens, "bw")
            fw_flipped = model(tokens.flip(1), "fw").flip(1)
        assert bw.shape == (3, length, model.config.total_vocab)
        torch.testing.assert_close(bw, fw_flipped, rtol=0, atol=1e-5)


def test_bw_equals_fw_on_reversed_input_with_distinct_position_bias_per_block():
    model = tiny_model(seed=2)
    randomize_position_bias(model, seed=2)
    for length in LENGTHS:
        tokens = random_tokens(3, length, VOCAB, seed=2)
        with torch.no_grad():
            bw = model(tokens, "bw")
            fw_flipped = model(tokens.flip(1), "fw").flip(1)
        torch.testing.assert_close(bw, fw_flipped, rtol=0, atol=1e-5)
        if length > 1:
            # the identity is not vacuous: bw over x is not simply fw over x
            with torch.no_grad():
                assert (model(tokens, "fw") - bw).abs().max() > 1e-3


def test_flip_identity_depends_on_the_distance_bias_being_used():
    """Changing position_bias_mult changes bw logits (so the identity above exercises the bias)."""
    model = tiny_model(seed=3)
    tokens = random_tokens(2, 16, VOCAB, seed=3)
    with torch.no_grad():
        before = model(tokens, "bw")
    randomize_position_bias(model, seed=3)
    with torch.no_grad():
        after = model(tokens, "bw")
    assert (after - before).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# 6. truncation
# ---------------------------------------------------------------------------------------------


def test_truncated_has_n_blocks_and_leaves_original_unchanged():
    model = tiny_model(seed=4)
    randomize_position_bias(model, seed=4)
    tokens = random_tokens(2, 16, VOCAB, seed=4)
    with torch.no_grad():
        before = {d: model(tokens, d) for d in ("fw", "bw")}
    blocks_before = list(model.blocks)
    for n in range(1, model.config.depth + 1):
        short = model.truncated(n)
        assert len(short.blocks) == n
        assert short.config.depth == n
        assert short is not model
    assert len(model.blocks) == model.config.depth == 3
    assert list(model.blocks) == blocks_before
    with torch.no_grad():
        for direction in ("fw", "bw"):
            assert torch.equal(model(tokens, direction), before[direction])


def test_truncated_to_full_depth_gives_identical_logits():
    model = tiny_model(seed=5)
    randomize_position_bias(model, seed=5)
    tokens = random_tokens(2, 33, VOCAB, seed=5)
    full = model.truncated(model.config.depth)
    with torch.no_grad():
        for direction in ("fw", "bw"):
            assert torch.equal(full(tokens, direction), model(tokens, direction))


@pytest.mark.parametrize("bw_mask", ("causal", "legacy-flip"))
def test_truncated_equals_manual_forward_through_first_n_blocks(bw_mask):
    model = tiny_model(seed=6, bw_mask=bw_mask)
    randomize_position_bias(model, seed=6)
    tokens = random_tokens(2, 7, VOCAB, seed=6)
    with torch.no_grad():
        for n in range(1, model.config.depth + 1):
            short = model.truncated(n)
            for direction in ("fw", "bw"):
                expected = manual_forward(model, tokens, direction, n)
                torch.testing.assert_close(short(tokens, direction), expected, rtol=0, atol=1e-6)
        # different depths really give different outputs
        assert (model.truncated(1)(tokens) - model(tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("n", (0, 4, -1))
def test_truncated_rejects_invalid_block_counts(n):
    model = tiny_model(seed=7)  # depth 3
    with pytest.raises(ValueError):
        model.truncated(n)


def test_truncated_shares_parameters_with_original_no_copy():
    model = tiny_model(seed=8)
    short = model.truncated(2)
    original_params = {id(p) for p in model.parameters()}
    assert all(id(p) in original_params for p in short.parameters())
    assert short.embedding.weight is model.embedding.weight
    assert short.output.weight is model.output.weight
    assert short.blocks[1].expand is model.blocks[1].expand
    assert short.blocks[0].expand.data_ptr() == model.blocks[0].expand.data_ptr()
    # in-place updates to the original (what an optimiser does) show up in the truncated view
    tokens = random_tokens(1, 7, VOCAB, seed=8)
    with torch.no_grad():
        before = short(tokens)
        model.blocks[0].position_bias_mult.fill_(-2.0)
        model.output.weight.mul_(2.0)
        after = short(tokens)
    assert (after - before).abs().max() > 1e-4
    expected_params = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.blocks[2].parameters()
    )
    assert sum(p.numel() for p in short.parameters()) == expected_params


# ---------------------------------------------------------------------------------------------
# attention heads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bw_mask", ("causal", "legacy-flip"))
def test_one_head_is_hlb_gpts_single_head_attention_bit_for_bit(bw_mask):
    model = tiny_model(seed=20, bw_mask=bw_mask)
    randomize_position_bias(model, seed=20)
    tokens = random_tokens(2, 16, VOCAB, seed=20)
    with torch.no_grad():
        for direction in ("fw", "bw"):
            expected = manual_forward(model, tokens, direction, model.config.depth, per_head_block)
            assert torch.equal(model(tokens, direction), expected)


@pytest.mark.parametrize("num_heads", (2, 4))
@pytest.mark.parametrize("bw_mask", ("causal", "legacy-flip"))
def test_heads_equal_attention_run_head_by_head(num_heads, bw_mask):
    model = tiny_model(seed=21, num_heads=num_heads, bw_mask=bw_mask).double()
    randomize_position_bias(model, seed=21)
    tokens = random_tokens(2, 16, VOCAB, seed=21)
    with torch.no_grad():
        for direction in ("fw", "bw"):
            expected = manual_forward(model, tokens, direction, model.config.depth, per_head_block)
            torch.testing.assert_close(model(tokens, direction), expected, rtol=0, atol=1e-12)


def test_heads_share_the_weights_of_one_head_but_not_its_output():
    one = tiny_model(seed=22)
    four = build_model(tiny_config(num_heads=4)).eval()
    four.load_state_dict(one.state_dict())  # the same parameters, shape for shape
    assert count_params(four.config) == count_params(one.config) == one.num_params() == four.num_params()
    tokens = random_tokens(2, 16, VOCAB, seed=22)
    with torch.no_grad():
        assert (four(tokens) - one(tokens)).abs().max() > 1e-4


@pytest.mark.parametrize("num_heads", (2, 4))
def test_bw_equals_fw_on_reversed_input_with_heads(num_heads):
    model = tiny_model(seed=23, num_heads=num_heads)
    randomize_position_bias(model, seed=23)
    tokens = random_tokens(3, 16, VOCAB, seed=23)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, "bw"), model(tokens.flip(1), "fw").flip(1), rtol=0, atol=1e-5)


def test_train_config_passes_num_heads_to_the_model():
    assert TrainConfig().num_heads == 1
    assert TrainConfig().model_config(100).num_heads == 1
    assert TrainConfig(width=128, num_heads=4).model_config(100).num_heads == 4


# ---------------------------------------------------------------------------------------------
# dropout: nanoGPT's residual dropout, in training mode only
# ---------------------------------------------------------------------------------------------


def test_dropout_in_eval_mode_gives_the_dropout_free_models_outputs_bit_for_bit():
    plain, dropped = tiny_model(seed=30), tiny_model(seed=30, dropout=0.5)
    tokens = random_tokens(2, 16, VOCAB, seed=30)
    with torch.no_grad():
        for direction in ("fw", "bw"):
            assert torch.equal(dropped(tokens, direction), plain(tokens, direction))


def test_bw_equals_fw_on_reversed_input_with_dropout_in_eval_mode():
    model = tiny_model(seed=31, dropout=0.5)
    randomize_position_bias(model, seed=31)
    tokens = random_tokens(3, 16, VOCAB, seed=31)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, "bw"), model(tokens.flip(1), "fw").flip(1), rtol=0, atol=1e-5)


def test_train_mode_drops_the_embedding_and_each_blocks_branch_before_the_residual_sum():
    model = tiny_model(seed=32, dropout=0.5).train()
    randomize_position_bias(model, seed=32)
    tokens = random_tokens(2, 16, VOCAB, seed=32)
    allowed, dist = mask_and_distance(16, "fw", "causal", max_seq_len=MAX_LEN)
    with torch.no_grad():
        torch.manual_seed(0)
        actual = model(tokens)
        torch.manual_seed(0)
        x = F.dropout(model.embedding(tokens), 0.5)
        for block in model.blocks:
            x = x + F.dropout(per_head_branch(block, x, allowed, dist), 0.5)
        assert torch.equal(actual, model.output(model.norm(x)))
        assert (actual - model.eval()(tokens)).abs().max() > 1e-3


def test_residual_dropout_zeroes_or_rescales_each_entry_in_training_mode_only():
    x = torch.rand(1000) + 1.0
    torch.manual_seed(0)
    dropped = residual_dropout(x, 0.25, training=True)
    kept = dropped != 0
    assert 150 < (~kept).sum() < 350
    torch.testing.assert_close(dropped[kept], x[kept] / 0.75, rtol=1e-6, atol=0)
    assert residual_dropout(x, 0.25, training=False) is x
    assert residual_dropout(x, 0.0, training=True) is x


@pytest.mark.parametrize(
    ("dropout", "mode", "draws"), [(0.0, "train", False), (0.5, "eval", False), (0.5, "train", True)]
)
def test_random_numbers_are_drawn_only_by_dropout_in_training_mode(dropout, mode, draws):
    model = getattr(tiny_model(seed=33, dropout=dropout), mode)()
    tokens = random_tokens(2, 16, VOCAB, seed=33)
    state = torch.get_rng_state()
    model.hidden(tokens, "fw").sum().backward()
    assert torch.equal(torch.get_rng_state(), state) != draws


def test_truncated_keeps_the_dropout():
    short = tiny_model(seed=34, dropout=0.5).truncated(2)
    assert short.config.dropout == 0.5
    assert [block.dropout for block in short.blocks] == [0.5, 0.5]


def test_a_model_config_written_before_dropout_loads_with_none(tmp_path):
    model = tiny_model(seed=35)
    save_model(tmp_path, model)
    written = json.loads((tmp_path / MODEL_CONFIG).read_text())
    del written["dropout"]
    (tmp_path / MODEL_CONFIG).write_text(json.dumps(written))
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert loaded.config.dropout == 0.0


# ---------------------------------------------------------------------------------------------
# 7. shapes and init (docs/method.md#the-model)
# ---------------------------------------------------------------------------------------------


def test_default_model_has_about_46m_parameters_and_the_specified_shapes():
    torch.manual_seed(0)
    d, depth, vocab = 384, 8, 50304
    model = build_model(ModelConfig(vocab_size=vocab, depth=depth, width=d, max_seq_len=1024))
    n = sum(p.numel() for p in model.parameters())
    assert 45e6 < n < 47e6
    assert model.num_params() == n
    per_block = (2 * d // 8 + 4 * d) * d + d * 2 * d + d + 1  # expand, project, norm weight, bias mult
    assert n == 2 * vocab * d + depth * per_block + d
    assert len(model.blocks) == depth
    for block in model.blocks:
        assert tuple(block.expand.shape) == (2 * d // 8 + 4 * d, d)
        assert tuple(block.project.shape) == (d, 2 * d)
    assert tuple(model.embedding.weight.shape) == (vocab, d)
    assert tuple(model.output.weight.shape) == (vocab, d)
    assert model.output.bias is None


def _relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / expected


def test_init_standard_deviations_match_spec():
    d, depth = 256, 2
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=VOCAB, depth=depth, width=d, max_seq_len=32))
    checks = {
        "embedding": (model.embedding.weight, 0.25 / math.sqrt(d)),
        "output": (model.output.weight, 0.5 / math.sqrt(d)),
    }
    for i, block in enumerate(model.blocks):
        checks[f"blocks.{i}.expand"] = (block.expand, 0.5 / math.sqrt(d) / 2)
        checks[f"blocks.{i}.project"] = (block.project, 1 / math.sqrt(d) / 2 / depth)
    for name, (weight, expected_std) in checks.items():
        std = weight.detach().std().item()
        assert _relative_error(std, expected_std) < 0.1, f"{name}: std {std:.5g}, expected {expected_std:.5g}"
        assert abs(weight.detach().mean().item()) < 0.1 * expected_std, name
    # the two headline ratios, explicitly
    assert _relative_error(model.output.weight.std().item() / model.embedding.weight.std().item(), 2.0) < 0.1


def test_position_bias_mult_is_a_scalar_initialised_at_one_in_every_block():
    model = tiny_model(seed=9)
    for block in model.blocks:
        assert block.position_bias_mult.shape == ()
        assert block.position_bias_mult.requires_grad
        assert block.position_bias_mult.item() == 1.0
    # one per block, not shared
    assert len({id(block.position_bias_mult) for block in model.blocks}) == model.config.depth


def _embedding_grad(model, tokens, **hidden_kwargs):
    model.zero_grad()
    model.hidden(tokens, "fw", **hidden_kwargs).pow(2).sum().backward()
    return model.embedding.weight.grad.clone()


def test_embedding_gradient_is_scaled_by_token_frequency_as_torch_scale_grad_by_freq():
    """hlb-gpt's nn.Embedding(scale_grad_by_freq=True), rebuilt so that the counts can come from
    a larger batch: on its own batch it gives torch's gradient, and it is not vacuous (tokens 3
    and 7 repeat, so unscaled gradients differ)."""
    model = tiny_model(seed=10)
    tokens = torch.tensor([[3, 3, 7, 1], [7, 3, 9, 2]])
    upstream = torch.randn(*tokens.shape, model.config.width, generator=torch.Generator().manual_seed(0))
    weight = model.embedding.weight

    def grad_of(embedded):
        return torch.autograd.grad((embedded * upstream).sum(), weight)[0]

    ours = grad_of(model.embed(tokens, 1, tokens))
    torch_scaled = grad_of(F.embedding(tokens, weight, scale_grad_by_freq=True))
    unscaled = grad_of(F.embedding(tokens, weight))
    torch.testing.assert_close(ours, torch_scaled, rtol=1e-6, atol=1e-9)
    assert (unscaled[3] - torch_scaled[3]).abs().max() > 1e-3


def test_embedding_counts_a_global_batch_so_shares_sum_to_its_gradient():
    """Two data-parallel shares, each counting the whole batch: their embedding gradients sum to
    the whole batch's; counting only its own share (the default) would not."""
    model = tiny_model(seed=10)
    batch = torch.tensor([[3, 3, 7, 1], [7, 3, 9, 2], [3, 5, 5, 7]])
    whole = _embedding_grad(model, batch)
    shares = [batch[:2], batch[2:]]
    summed = sum(_embedding_grad(model, share, counted=batch) for share in shares)
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-8)
    local = sum(_embedding_grad(model, share) for share in shares)
    assert (local - whole).abs().max() > 1e-3


def test_layer_norms_have_weight_but_no_bias_one_per_block_plus_final():
    model = tiny_model(seed=11)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == model.config.depth + 1
    for norm in norms:
        assert norm.bias is None
        assert norm.weight is not None and norm.weight.shape == (model.config.width,)
    for block in model.blocks:
        assert sum(isinstance(m, nn.LayerNorm) for m in block.modules()) == 1
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_task_tokens_add_exactly_two_vocab_rows():
    plain = tiny_model(seed=12)
    tasked = tiny_model(seed=12, task_tokens=True)
    config = tasked.config
    assert plain.config.total_vocab == VOCAB
    assert config.total_vocab == VOCAB + 2
    assert (config.fw_token_id, config.bw_token_id) == (VOCAB, VOCAB + 1)
    assert tasked.embedding.weight.shape[0] == plain.embedding.weight.shape[0] + 2
    assert tasked.output.weight.shape[0] == plain.output.weight.shape[0] + 2
    assert tasked.num_params() - plain.num_params() == 2 * 2 * config.width
    tokens = torch.tensor([[config.fw_token_id, 3, 4, 5], [6, 7, 8, config.bw_token_id]])
    with torch.no_grad():
        assert tasked(tokens, "fw").shape == (2, 4, VOCAB + 2)
        assert tasked(tokens, "bw").shape == (2, 4, VOCAB + 2)


def test_sequence_longer_than_max_seq_len_raises():
    model = tiny_model(seed=13, max_seq_len=8)
    with torch.no_grad():
        assert model(random_tokens(1, 8, VOCAB), "fw").shape == (1, 8, VOCAB)
        for direction in ("fw", "bw"):
            with pytest.raises(ValueError):
                model(random_tokens(1, 9, VOCAB), direction)


def test_unknown_direction_raises():
    model = tiny_model(seed=14)
    with pytest.raises(ValueError):
        model(random_tokens(1, 4, VOCAB), "sideways")


def test_forward_default_direction_is_fw_and_output_is_finite():
    model = tiny_model(seed=15)
    tokens = random_tokens(2, 33, VOCAB)
    with torch.no_grad():
        logits = model(tokens)
        assert torch.equal(logits, model(tokens, "fw"))
        assert torch.isfinite(logits).all()
        assert torch.isfinite(model(tokens, "bw")).all()


# ---------------------------------------------------------------------------------------------
# 8. ModelConfig validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("width", dict(width=20)),
        ("width", dict(width=33)),
        ("depth", dict(depth=0)),
        ("depth", dict(depth=-1)),
        ("bw_mask", dict(bw_mask="flip")),
        ("bw_mask", dict(bw_mask="Causal")),
        ("num_heads", dict(num_heads=0)),
        ("num_heads", dict(num_heads=3)),  # width 32: q/k width 4
        ("num_heads", dict(num_heads=8)),
        ("dropout", dict(dropout=-0.1)),
        ("dropout", dict(dropout=1.0)),
        ("dropout", dict(dropout=float("nan"))),
    ],
)
def test_model_config_rejects_bad_values_naming_the_field(field, overrides):
    with pytest.raises(fwbw.schema.ConfigError) as error:
        tiny_config(**overrides)
    assert str(error.value).startswith(field)
    assert str(error.value).startswith(f"{field}:")
    assert isinstance(error.value, ValueError)


def test_model_config_accepts_the_valid_edge_values():
    assert tiny_config(width=8, depth=1).width == 8
    assert tiny_config(bw_mask="legacy-flip").bw_mask == "legacy-flip"
    assert tiny_config().num_heads == 1
    assert tiny_config(num_heads=4).num_heads == 4  # q/k width 4, width 32
    assert tiny_config().bw_mask == "causal"
    assert tiny_config().task_tokens is False
    assert tiny_config().dropout == 0.0
    assert tiny_config(dropout=0.99).dropout == 0.99

"""Masks and label leaks (docs/method.md#the-bw-mask-defect).

Two layers of checks:
- mask level: the exact `allowed` / `dist` matrices `fwbw.model.masks.mask_and_distance` returns;
- model level: a perturbation probe on a real (tiny, float64, randomised) model. For every
  position j we change tokens[j] to a different id and record which logit positions t moved.
  That gives a dependency matrix D[t, j] which must equal the mask's promise *exactly*: a
  dependency where none is allowed is a leak, a missing one is an over-restrictive mask.

The negative controls at the bottom swap in deliberately wrong masks and assert that the probe
notices, so the probe cannot silently pass everything.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fwbw.model.hlb_gpt
import fwbw.model.masks
from fwbw import ModelConfig, build_model
from fwbw.model.masks import leaks_labels, mask_and_distance

LENGTHS = (1, 2, 7, 16, 33)
MAX_LEN = 33
VOCAB = 50

# float64: positions that must not move are within ~1e-15; positions that must move move by
# ~1e-2 with the randomised model below. The thresholds sit far from both.
SAME_ATOL = 1e-10
CHANGED_MIN = 1e-6


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def randomized_model(
    depth: int = 3, width: int = 16, bw_mask: str = "causal", task_tokens: bool = False, seed: int = 0,
    num_heads: int = 1,
):
    """A tiny float64 model whose dependencies are all clearly visible.

    The per-block position_bias_mult is set to distinct strongly negative values, so that
    softplus(m) is small and even the farthest allowed key keeps a non-negligible attention
    weight; the residual branch projections are scaled up so attention contributes visibly.
    """
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB, depth=depth, width=width, max_seq_len=MAX_LEN, bw_mask=bw_mask, task_tokens=task_tokens,
        num_heads=num_heads,
    )
    model = build_model(config).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.position_bias_mult.fill_(float(torch.empty(()).uniform_(-5.0, -2.0, generator=generator)))
            block.project.mul_(4.0)
            block.norm.weight.uniform_(0.5, 1.5, generator=generator)
        model.norm.weight.uniform_(0.5, 1.5, generator=generator)
    return model


def sample_tokens(length: int, config: ModelConfig, direction: str, seed: int = 0) -> torch.Tensor:
    """One sequence of `length` ids. With task tokens it carries its task marker the way the study
    does: the fw token at the start for fw, the bw token at the end for bw."""
    generator = torch.Generator().manual_seed(1000 + seed + length)
    tokens = torch.randint(0, config.vocab_size, (length,), generator=generator)
    if config.task_tokens:
        if direction == "fw":
            tokens[0] = config.fw_token_id
        else:
            tokens[-1] = config.bw_token_id
    return tokens


def different_id(token: int, salt: int, vocab: int) -> int:
    """An id that is guaranteed to differ from `token` (offset in 1..vocab-1)."""
    return (token + 1 + salt % (vocab - 1)) % vocab


def dependency_matrix(model, tokens: torch.Tensor, direction: str) -> torch.Tensor:
    """D[t, j] = True iff logits[t] change when tokens[j] is changed to a different id.

    One batched forward: row 0 is the original, row j + 1 has position j perturbed. Every
    difference must be clearly "same" or clearly "changed", never in between.
    """
    length = tokens.shape[0]
    vocab = model.config.total_vocab
    batch = tokens.repeat(length + 1, 1)
    for j in range(length):
        batch[j + 1, j] = different_id(int(tokens[j]), j, vocab)
        assert batch[j + 1, j] != tokens[j]
    with torch.no_grad():
        logits = model(batch, direction)
    assert logits.shape == (length + 1, length, vocab)
    diff = (logits[1:] - logits[:1]).abs().amax(dim=-1)  # [j, t]
    ambiguous = (diff > SAME_ATOL) & (diff < CHANGED_MIN)
    assert not ambiguous.any(), f"ambiguous logit differences: {diff[ambiguous]}"
    return (diff >= CHANGED_MIN).T.contiguous()  # [t, j]


def expected_dependency(length: int, direction: str) -> torch.Tensor:
    ones = torch.ones(length, length, dtype=torch.bool)
    return ones.tril() if direction == "fw" else ones.triu()


def bw_target_leak_rows(model, inputs: torch.Tensor) -> set[int]:
    """Rows t >= 1 whose logits change when their bw target inputs[t - 1] is perturbed.

    Convention shared by causal bw (`model(x, "bw")[:, t]` predicts x[t-1]) and the study's
    legacy-flip training (input = w[1:], position i predicts w[i] = input[i-1])."""
    dependency = dependency_matrix(model, inputs, "bw")
    return {t for t in range(1, inputs.shape[0]) if bool(dependency[t, t - 1])}


def assert_dependency_exact(actual: torch.Tensor, expected: torch.Tensor, direction: str) -> None:
    leaks = (actual & ~expected).nonzero().tolist()
    missing = (expected & ~actual).nonzero().tolist()
    assert not leaks, f"{direction}: logits[t] depend on forbidden tokens[j], (t, j) = {leaks[:10]}"
    assert not missing, f"{direction}: logits[t] ignore allowed tokens[j], (t, j) = {missing[:10]}"


# ---------------------------------------------------------------------------------------------
# 4. mask level
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", LENGTHS)
def test_fw_mask_is_lower_triangular_including_diagonal(length):
    allowed, dist = mask_and_distance(length, "fw")
    assert allowed.dtype == torch.bool
    assert allowed.shape == dist.shape == (length, length)
    assert torch.equal(allowed, torch.ones(length, length, dtype=torch.bool).tril())


@pytest.mark.parametrize("length", LENGTHS)
def test_causal_bw_mask_is_upper_triangular_including_diagonal(length):
    allowed, dist = mask_and_distance(length, "bw", "causal")
    assert allowed.dtype == torch.bool
    assert allowed.shape == dist.shape == (length, length)
    assert torch.equal(allowed, torch.ones(length, length, dtype=torch.bool).triu())


def test_bw_mask_defaults_to_causal():
    allowed, dist = mask_and_distance(9, "bw")
    causal_allowed, causal_dist = mask_and_distance(9, "bw", "causal")
    assert torch.equal(allowed, causal_allowed)
    assert torch.equal(dist, causal_dist)


@pytest.mark.parametrize("length", LENGTHS)
def test_fw_distance_is_key_minus_query(length):
    _, dist = mask_and_distance(length, "fw")
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    assert dist.is_floating_point()
    assert torch.equal(dist, (j - i).to(dist.dtype))


@pytest.mark.parametrize("length", LENGTHS)
def test_causal_bw_distance_is_minus_absolute_offset(length):
    """-|i - j| on every allowed entry. Outside the mask the value never reaches attention; there
    the matrix is i - j, the point mirror of the fw matrix j - i (checked in the mirror test)."""
    allowed, dist = mask_and_distance(length, "bw", "causal")
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    assert dist.is_floating_point()
    expected = -(j - i).abs().to(dist.dtype)
    assert torch.equal(dist[allowed], expected[allowed])
    assert torch.equal(dist, (i - j).to(dist.dtype))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(("direction", "bw_mask"), [("fw", "causal"), ("bw", "causal"), ("bw", "legacy-flip")])
def test_distance_is_non_positive_wherever_attention_is_allowed(length, direction, bw_mask):
    allowed, dist = mask_and_distance(length, direction, bw_mask, max_seq_len=MAX_LEN)
    assert (dist[allowed] <= 0).all()
    # every query sees at least one key (no all -inf row)
    assert allowed.any(dim=1).all()


@pytest.mark.parametrize("length", LENGTHS)
def test_causal_bw_is_the_mirror_image_of_fw(length):
    fw_allowed, fw_dist = mask_and_distance(length, "fw")
    bw_allowed, bw_dist = mask_and_distance(length, "bw", "causal")
    assert torch.equal(bw_allowed, fw_allowed.flip(0, 1))
    assert torch.equal(bw_dist, fw_dist.flip(0, 1))
    assert torch.equal(bw_allowed, fw_allowed.T)


def study_legacy_tables(length: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The study's bw tables, rebuilt independently: at the maximum length M the mask tril(ones)
    and the fw distance j - i, both flipped along their rows, then sliced [:T, :T]."""
    tril = np.array([[1 if j <= i else 0 for j in range(max_len)] for i in range(max_len)])
    fw_distance = np.array([[j - i for j in range(max_len)] for i in range(max_len)])
    return tril[::-1][:length, :length] == 1, fw_distance[::-1][:length, :length]


@pytest.mark.parametrize("length", (8, 16, 29, 32))  # M/4, M/2, M - 3, M
def test_legacy_flip_is_the_studys_max_length_tables_sliced_to_the_current_length(length):
    max_len = 32
    allowed, dist = mask_and_distance(length, "bw", "legacy-flip", max_seq_len=max_len)
    study_allowed, study_dist = study_legacy_tables(length, max_len)
    assert allowed.dtype == torch.bool and dist.dtype == torch.float32
    assert allowed.tolist() == study_allowed.tolist()
    assert dist.tolist() == study_dist.astype(float).tolist()
    # in closed form: allowed iff i + j <= M - 1, dist = i + j - (M - 1), so <= 0 where allowed
    i, j = np.indices((length, length))
    assert (study_allowed == (i + j <= max_len - 1)).all()
    assert (study_dist == i + j - (max_len - 1)).all()
    assert (study_dist[study_allowed] <= 0).all()


@pytest.mark.parametrize("length", (2, 8, 16))
def test_legacy_flip_admits_every_key_up_to_half_the_max_length(length):
    allowed, _ = mask_and_distance(length, "bw", "legacy-flip", max_seq_len=32)
    assert allowed.all()
    assert not mask_and_distance(17, "bw", "legacy-flip", max_seq_len=32)[0].all()


@pytest.mark.parametrize("length", LENGTHS)
def test_legacy_flip_at_the_max_length_is_the_flipped_tril_with_flipped_fw_distance(length):
    allowed, dist = mask_and_distance(length, "bw", "legacy-flip")  # max_seq_len defaults to T
    _, fw_dist = mask_and_distance(length, "fw")
    assert torch.equal(allowed, torch.tril(torch.ones(length, length)).flip(0).bool())
    assert torch.equal(dist, fw_dist.flip(0))
    explicit = mask_and_distance(length, "bw", "legacy-flip", max_seq_len=length)
    assert torch.equal(allowed, explicit[0]) and torch.equal(dist, explicit[1])
    # row i admits exactly keys 0..T-1-i
    for i in range(length):
        assert allowed[i].nonzero().flatten().tolist() == list(range(length - i))


def test_legacy_flip_rejects_a_length_beyond_the_max():
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        mask_and_distance(9, "bw", "legacy-flip", max_seq_len=8)


def test_unknown_direction_raises_value_error():
    with pytest.raises(ValueError, match="direction"):
        mask_and_distance(4, "sideways")
    with pytest.raises(ValueError, match="direction"):
        mask_and_distance(4, "FW")


def test_unknown_bw_mask_raises_value_error():
    with pytest.raises(ValueError, match="bw_mask"):
        mask_and_distance(4, "bw", "tril-flip")
    with pytest.raises(ValueError, match="bw_mask"):
        mask_and_distance(4, "bw", "")


def test_masks_follow_the_requested_device():
    allowed, dist = mask_and_distance(5, "bw", "causal", device=torch.device("cpu"))
    assert allowed.device.type == dist.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# 3. legacy-flip leaks, derived from the mask
# ---------------------------------------------------------------------------------------------


def test_leaks_labels_flags_only_legacy_flip():
    assert leaks_labels("legacy-flip") is True
    assert leaks_labels("causal") is False


@pytest.mark.parametrize("length", (2, 3, 7, 16, 33))
@pytest.mark.parametrize("max_len", (None, 33, 64))
def test_legacy_flip_mask_lets_exactly_rows_1_to_half_M_see_their_target(length, max_len):
    # study convention: input = w[1:] (length T), position i predicts w[i] = input[i - 1]
    allowed, _ = mask_and_distance(length, "bw", "legacy-flip", max_seq_len=max_len)
    half = (max_len or length) / 2
    seeing_own_target = {i for i in range(1, length) if bool(allowed[i, i - 1])}
    assert seeing_own_target == {i for i in range(1, length) if i <= half}
    assert seeing_own_target  # non-empty for T >= 2: the leak is real


@pytest.mark.parametrize("length", (2, 3, 7, 16, 33))
def test_causal_bw_mask_lets_no_row_see_its_target(length):
    allowed, _ = mask_and_distance(length, "bw", "causal")
    assert not any(bool(allowed[t, t - 1]) for t in range(1, length))
    fw_allowed, _ = mask_and_distance(length, "fw")
    # fw: position t predicts tokens[t + 1]
    assert not any(bool(fw_allowed[t, t + 1]) for t in range(length - 1))


# ---------------------------------------------------------------------------------------------
# 1. perturbation probe on the model: exact dependency structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", (1, 2), ids=("1head", "2heads"))
@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
@pytest.mark.parametrize("direction", ("fw", "bw"))
def test_perturbation_dependencies_match_the_causal_mask_exactly(direction, task_tokens, num_heads):
    """fw: logits[t] move iff the changed position j <= t (t < j identical, t = j changes, and every
    earlier position is really used). bw: mirror image, t > j identical, t = j changes."""
    model = randomized_model(depth=3, task_tokens=task_tokens, num_heads=num_heads)
    for length in LENGTHS:
        tokens = sample_tokens(length, model.config, direction)
        dependency = dependency_matrix(model, tokens, direction)
        assert_dependency_exact(dependency, expected_dependency(length, direction), f"{direction} T={length}")
        # spelled out for the diagonal: the model does use the token at its own position
        assert dependency.diagonal().all()


@pytest.mark.parametrize("direction", ("fw", "bw"))
def test_perturbation_dependencies_hold_for_a_single_wide_block(direction):
    model = randomized_model(depth=1, width=32, seed=3)
    length = 16
    tokens = sample_tokens(length, model.config, direction, seed=3)
    dependency = dependency_matrix(model, tokens, direction)
    assert_dependency_exact(dependency, expected_dependency(length, direction), direction)


# ---------------------------------------------------------------------------------------------
# 2. label leaks, stated in terms of the training task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_fw_logits_do_not_see_their_target(task_tokens):
    """fw training: logits[:, t] are scored against tokens[:, t + 1]; perturbing that target must
    leave logits[:, t] unchanged, while perturbing tokens[:, t] (the newest visible one) must not."""
    model = randomized_model(depth=2, task_tokens=task_tokens, seed=5)
    vocab = model.config.total_vocab
    for length in (2, 7, 33):
        tokens = sample_tokens(length, model.config, "fw", seed=5)
        with torch.no_grad():
            base = model(tokens[None], "fw")[0]
            for t in range(length - 1):
                target_changed = tokens.clone()
                target_changed[t + 1] = different_id(int(tokens[t + 1]), t, vocab)
                assert torch.allclose(model(target_changed[None], "fw")[0, t], base[t], rtol=0, atol=SAME_ATOL), (
                    f"fw T={length}: logits[{t}] see their target tokens[{t + 1}]"
                )
                visible_changed = tokens.clone()
                visible_changed[t] = different_id(int(tokens[t]), t, vocab)
                assert (model(visible_changed[None], "fw")[0, t] - base[t]).abs().max() > CHANGED_MIN


@pytest.mark.parametrize("task_tokens", (False, True), ids=("plain", "task_tokens"))
def test_causal_bw_logits_do_not_see_their_target(task_tokens):
    """bw training (model(x, "bw") convention): logits[:, t] are scored against x[:, t - 1];
    perturbing that target must leave logits[:, t] unchanged, while perturbing x[:, t] must not."""
    model = randomized_model(depth=2, task_tokens=task_tokens, seed=6)
    vocab = model.config.total_vocab
    for length in (2, 7, 33):
        tokens = sample_tokens(length, model.config, "bw", seed=6)
        with torch.no_grad():
            base = model(tokens[None], "bw")[0]
            for t in range(1, length):
                target_changed = tokens.clone()
                target_changed[t - 1] = different_id(int(tokens[t - 1]), t, vocab)
                assert torch.allclose(model(target_changed[None], "bw")[0, t], base[t], rtol=0, atol=SAME_ATOL), (
                    f"bw T={length}: logits[{t}] see their target x[{t - 1}]"
                )
                visible_changed = tokens.clone()
                visible_changed[t] = different_id(int(tokens[t]), t, vocab)
                assert (model(visible_changed[None], "bw")[0, t] - base[t]).abs().max() > CHANGED_MIN
        assert bw_target_leak_rows(model, tokens) == set()


# ---------------------------------------------------------------------------------------------
# 3. legacy-flip DOES leak, confirmed on the model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", (2, 3, 7, 16, 33))
def test_legacy_flip_single_block_leaks_exactly_rows_1_to_half_M(length):
    """Study convention: input = w[1:], position i predicts w[i] = input[i - 1]. With one block the
    rows whose logits move when their own target moves are exactly {i : 1 <= i <= M/2}, the rows
    the mask (sliced from the max length M = 33) lets see it directly."""
    model = randomized_model(depth=1, bw_mask="legacy-flip", seed=7)
    w = sample_tokens(length + 1, model.config, "bw", seed=7)
    inputs = w[1:]
    allowed, _ = mask_and_distance(length, "bw", "legacy-flip", max_seq_len=MAX_LEN)
    from_mask = {i for i in range(1, length) if bool(allowed[i, i - 1])}
    leaking = bw_target_leak_rows(model, inputs)
    assert leaking == from_mask == {i for i in range(1, length) if 2 * i <= MAX_LEN}
    assert leaking, "legacy-flip should leak at least row 1"
    # and the single-block dependency structure is exactly the mask, plus each position's own
    # token, which reaches it through the residual stream whatever the mask says
    expected = allowed | torch.eye(length, dtype=torch.bool)
    assert_dependency_exact(dependency_matrix(model, inputs, "bw"), expected, "legacy-flip")


@pytest.mark.parametrize("length", (3, 7, 16, 33))
def test_legacy_flip_with_two_or_more_blocks_leaks_every_row(length):
    """Through two blocks the leak is total: row 0 of legacy-flip sees every key, and every row sees
    key 0, so from the second block on every position i >= 1 depends on its target (and on all
    tokens). The study's models (depth 4-32) were in this regime."""
    model = randomized_model(depth=2, bw_mask="legacy-flip", seed=8)
    inputs = sample_tokens(length, model.config, "bw", seed=8)
    assert bw_target_leak_rows(model, inputs) == set(range(1, length))
    assert dependency_matrix(model, inputs, "bw").all()


@pytest.mark.parametrize(("length", "reads_last"), [(8, True), (16, True), (33, False)])
def test_legacy_flip_single_block_reads_the_last_token_below_half_the_max_length(length, reads_last):
    """With the tables sliced from M = 33, a one-block legacy model's bw logits at position 1 move
    when the last token moves for T <= M/2 (the slice is all ones), but not at T = M, where row 1
    admits keys 0..M-2 only. (Flipping at T, as fwbw once did, never admitted it.)"""
    model = randomized_model(depth=1, bw_mask="legacy-flip", seed=13)
    tokens = sample_tokens(length, model.config, "bw", seed=13)
    changed = tokens.clone()
    changed[-1] = different_id(int(tokens[-1]), 0, VOCAB)
    with torch.no_grad():
        moved = (model(changed[None], "bw")[0, 1] - model(tokens[None], "bw")[0, 1]).abs().max()
    assert bool(moved > CHANGED_MIN) is reads_last
    assert reads_last or moved < SAME_ATOL


def test_legacy_flip_leaves_fw_untouched():
    legacy = randomized_model(depth=2, bw_mask="legacy-flip", seed=9)
    causal = randomized_model(depth=2, bw_mask="causal", seed=9)
    tokens = sample_tokens(16, legacy.config, "fw", seed=9)
    with torch.no_grad():
        assert torch.equal(legacy(tokens[None], "fw"), causal(tokens[None], "fw"))
    assert_dependency_exact(dependency_matrix(legacy, tokens, "fw"), expected_dependency(16, "fw"), "fw")


# ---------------------------------------------------------------------------------------------
# negative controls: the probe must catch deliberately wrong masks
# ---------------------------------------------------------------------------------------------


def _patched(broken):
    """A mask_and_distance that returns `broken(T)` for one case and the real masks otherwise."""
    real = fwbw.model.masks.mask_and_distance

    def make(case):
        def patched(seq_len, direction, bw_mask="causal", max_seq_len=None, device=None):
            if (direction, bw_mask if direction == "bw" else None) == case:
                allowed = broken(seq_len)
                offsets = torch.arange(seq_len)[None, :] - torch.arange(seq_len)[:, None]
                return allowed, -offsets.abs().float()
            return real(seq_len, direction, bw_mask, max_seq_len, device)

        return patched

    return make


LEAKY_MASKS = {
    "fw_full": (("fw", None), lambda n: torch.ones(n, n, dtype=torch.bool)),
    "fw_sees_next": (("fw", None), lambda n: torch.ones(n, n, dtype=torch.bool).tril(1)),
    "bw_uses_fw_mask": (("bw", "causal"), lambda n: torch.ones(n, n, dtype=torch.bool).tril()),
    "bw_sees_previous": (("bw", "causal"), lambda n: torch.ones(n, n, dtype=torch.bool).triu(-1)),
}

RESTRICTIVE_MASKS = {
    "fw_diagonal_only": (("fw", None), lambda n: torch.eye(n, dtype=torch.bool)),
    "bw_window_of_2": (
        ("bw", "causal"),
        lambda n: torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(2),
    ),
}


@pytest.mark.parametrize("name", sorted(LEAKY_MASKS))
def test_negative_control_probe_detects_a_deliberately_leaky_mask(name, monkeypatch):
    case, broken = LEAKY_MASKS[name]
    # the model binds the name at import, so patch it where the model looks it up
    monkeypatch.setattr(fwbw.model.hlb_gpt, "mask_and_distance", _patched(broken)(case))
    direction = case[0]
    model = randomized_model(depth=2, seed=11)
    length = 7
    tokens = sample_tokens(length, model.config, direction, seed=11)
    dependency = dependency_matrix(model, tokens, direction)
    expected = expected_dependency(length, direction)
    with pytest.raises(AssertionError, match="forbidden"):
        assert_dependency_exact(dependency, expected, direction)
    if direction == "bw":
        assert bw_target_leak_rows(model, tokens), "a leaky bw mask must show up as a label leak"
    else:
        with torch.no_grad():
            base = model(tokens[None], "fw")[0]
            perturbed = tokens.clone()
            perturbed[1] = different_id(int(tokens[1]), 0, VOCAB)
            assert (model(perturbed[None], "fw")[0, 0] - base[0]).abs().max() > CHANGED_MIN


@pytest.mark.parametrize("name", sorted(RESTRICTIVE_MASKS))
def test_negative_control_probe_detects_an_over_restrictive_mask(name, monkeypatch):
    case, broken = RESTRICTIVE_MASKS[name]
    monkeypatch.setattr(fwbw.model.hlb_gpt, "mask_and_distance", _patched(broken)(case))
    direction = case[0]
    model = randomized_model(depth=1, seed=12)
    length = 7
    tokens = sample_tokens(length, model.config, direction, seed=12)
    dependency = dependency_matrix(model, tokens, direction)
    with pytest.raises(AssertionError, match="ignore allowed"):
        assert_dependency_exact(dependency, expected_dependency(length, direction), direction)

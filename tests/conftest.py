import numpy as np
import pytest

from fwbw.data.corpora import TokenData
from fwbw.training.config import RecipeConfig, TrainConfig


def synthetic_stream(rng: np.random.Generator, length: int, vocab: int) -> np.ndarray:
    """x[t+1] = (5 x[t] + 3) mod vocab, with a random token 10% of the time: the map is a
    bijection, so the stream is about equally predictable forwards and backwards."""
    tokens = np.empty(length, dtype=np.uint16)
    tokens[0] = 0
    jumps = rng.random(length) < 0.1
    random_tokens = rng.integers(0, vocab, length)
    for t in range(1, length):
        tokens[t] = random_tokens[t] if jumps[t] else (5 * int(tokens[t - 1]) + 3) % vocab
    return tokens


def synthetic_tokens(seed: int = 0, vocab: int = 64, train_len: int = 40_000) -> TokenData:
    rng = np.random.default_rng(seed)
    return TokenData(synthetic_stream(rng, train_len, vocab), synthetic_stream(rng, 4096, vocab), vocab, "synthetic", "none")


@pytest.fixture
def tiny_data() -> TokenData:
    return synthetic_tokens()


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        depth=2,
        width=32,
        seq_len=32,
        p_bw=0.5,
        train_tokens=12_000,
        eval_every_epochs=0.05,
        eval_tokens=2048,
        dtype="fp32",
        checkpoint_every_steps=4,
        # hlb-gpt's lr formula explodes for a 20k-parameter model: scale it down
        recipe=RecipeConfig(tokens_per_microbatch=512, seq_len_growth_steps=4, lr_scale=0.02),
    )
    values.update(overrides)
    return TrainConfig(**values)

"""The fixed evaluation windows: validation (consecutive from the start) and the training split's
(evenly spaced over the whole split)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fwbw.data.windows import evenly_spaced_windows, train_eval_set, validation_windows


def starts(windows) -> list[int]:
    return windows[:, 0].tolist()  # the tokens are their own positions


@pytest.mark.parametrize(
    "tokens, max_tokens, expected",
    [
        (100, 40, [0, 30, 60, 90]),  # 4 windows, 30 apart: the last ends at the end
        (101, 40, [0, 30, 61, 91]),  # 91 / 3 apart, rounded: 30.33 -> 30, 60.67 -> 61
        (100, 15, [0]),  # one window: the start
        (25, 1000, [0, 15]),  # the budget exceeds the split: as many windows as fit
        (20, 1000, [0, 10]),  # exactly two windows: they tile the split
    ],
)
def test_evenly_spaced_windows(tokens, max_tokens, expected):
    windows = evenly_spaced_windows(np.arange(tokens, dtype=np.uint16), 10, max_tokens)
    assert starts(windows) == expected
    assert windows.tolist() == [list(range(s, s + 10)) for s in expected]


def test_evenly_spaced_windows_need_one_window():
    with pytest.raises(ValueError, match="^training split has 9 tokens, fewer than one window of 10$"):
        evenly_spaced_windows(np.arange(9), 10, 100)


def test_train_eval_set_spans_the_training_split_and_validation_stays_consecutive():
    tokens = np.arange(2000, dtype=np.uint16)
    config = SimpleNamespace(seq_len=32, task_tokens=False, train_eval_tokens=1056)  # windows of 33
    windows = train_eval_set(config, tokens)
    assert windows.shape == (32, 33)
    assert starts(windows) == [round(i * 1967 / 31) for i in range(32)]
    assert starts(windows)[:4] == [0, 63, 127, 190] and starts(windows)[-1] == 1967  # 63.45 apart
    assert starts(validation_windows(tokens, 33, 1056)) == list(range(0, 32 * 33, 33))
    assert train_eval_set(SimpleNamespace(seq_len=32, task_tokens=False, train_eval_tokens=0), tokens) is None

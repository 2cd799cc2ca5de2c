"""The chunked output-layer cross-entropy equals the plain one, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from fwbw.model import losses
from fwbw.model.losses import linear_cross_entropy


@pytest.mark.parametrize("tokens", [5, 1024, 2500])
def test_matches_full_logits_cross_entropy(tokens, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_TOKENS", 512)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, 24, requires_grad=True)
    weight = torch.randn(300, 24, requires_grad=True)
    targets = torch.randint(0, 300, (tokens,))
    loss, correct = linear_cross_entropy(hidden, weight, targets, accuracy=True)
    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, expected)
    assert correct.item() == (logits.argmax(-1) == targets).sum().item()
    (3 * loss).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3 * expected).backward()
    torch.testing.assert_close(fused_grads[0], hidden.grad)
    torch.testing.assert_close(fused_grads[1], weight.grad)


def test_no_grad_and_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = torch.randn(64, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (64,))
    with torch.no_grad():
        loss, correct = linear_cross_entropy(hidden, weight, targets)
    assert correct is None
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = linear_cross_entropy(hidden, weight, targets)
    assert low.dtype == torch.float32
    assert abs(low.item() - loss.item()) < 0.05 * loss.item()

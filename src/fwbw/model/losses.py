"""Cross-entropy of the output layer without materialising all logits.

The logits of a large vocabulary dominate a step's memory traffic (4096 tokens x 50304 ids in
fp32 is 824 MB, and the usual path writes it several times). Since the loss ends the graph, its
gradient w.r.t. the logits is known during the forward pass:
    d loss / d logits = (softmax(logits) - onehot(target)) / N.
So the forward pass walks over token chunks, computes each chunk's logits, loss and that
gradient, and turns it at once into the gradients of the hidden states (g @ W) and of the output
weight (g^T @ h); backward only scales them by the incoming gradient. Under autocast the
matmuls run in its dtype, the softmax in fp32.
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 1024


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would use here, or the tensor's own outside autocast."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, with_grad: bool, accuracy: bool):
        dtype = _compute_dtype(hidden)
        count = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            low_weight = weight.to(dtype)  # cast once, not once per chunk and matmul
            for start in range(0, count, CHUNK_TOKENS):
                rows = slice(start, start + CHUNK_TOKENS)
                chunk, chunk_targets = hidden[rows].to(dtype), targets[rows]
                log_probs = torch.log_softmax(chunk @ low_weight.t(), dim=-1, dtype=torch.float32)
                loss -= log_probs.gather(1, chunk_targets[:, None]).sum()
                if accuracy:
                    correct += (log_probs.argmax(dim=-1) == chunk_targets).sum()
                if with_grad:
                    grad_logits = log_probs.exp_()  # softmax - onehot; the 1/N comes at the end
                    grad_logits[torch.arange(len(chunk_targets), device=hidden.device), chunk_targets] -= 1.0
                    low_grad = grad_logits.to(dtype)
                    grad_hidden[rows] = low_grad @ low_weight
                    grad_weight += low_grad.t() @ chunk
        if with_grad:
            grad_hidden /= count
            grad_weight /= count
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss / count, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, accuracy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (and, if asked, the number
    of correct argmax predictions), equal to F.cross_entropy on the full logits."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, correct = _LinearCrossEntropy.apply(hidden, weight, targets, with_grad, accuracy)
    return loss, correct if accuracy else None

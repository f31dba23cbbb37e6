"""The chunked frozen-head cross-entropy equals the plain one, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from router_tune.losses.lm_loss import lm_loss_sum


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_ce_equals_full_logits_ce(chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, 7] = -100

    expected = F.cross_entropy(
        head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (grad_expected,) = torch.autograd.grad(expected * 0.5, hidden)
    got = lm_loss_sum(hidden, head, labels, chunk)
    (grad,) = torch.autograd.grad(got * 0.5, hidden)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-5, atol=1e-7)


def test_trainable_head_is_refused():
    head = nn.Linear(4, 9, bias=False)
    with pytest.raises(ValueError, match="frozen"):
        lm_loss_sum(torch.randn(1, 3, 4), head, torch.zeros(1, 3, dtype=torch.long), 2)


@pytest.mark.parametrize(
    "hidden_dtype, head_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32-hidden-bf16-head", "bf16-hidden-fp32-head", "bf16-both"],
)
def test_mixed_dtypes_compute_in_the_heads_dtype(hidden_dtype, head_dtype):
    """Under bf16 autocast accelerate returns fp32 hidden states beside a bf16 head (the recipe crash):
    the loss multiplies in the head's dtype, and the gradient comes back in the hidden states' dtype."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).to(head_dtype).requires_grad_(False)
    hidden = torch.randn(2, 9, 16).to(hidden_dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (2, 9))

    logits = (hidden.to(head_dtype) @ head.weight.T).float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    (grad_expected,) = torch.autograd.grad(expected, hidden)
    got = lm_loss_sum(hidden, head, labels, 5)
    (grad,) = torch.autograd.grad(got, hidden)
    assert got.dtype == torch.float32 and grad.dtype == hidden_dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), grad_expected.float(), rtol=2e-2, atol=2e-3)

"""The private PyTorch operators behind encoders/onednn.py, by name: an upgrade that removes or changes one fails
here, not as a slow or wrong encoder somewhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from encoders import onednn


def test_the_private_operators_exist():
    ops = torch.ops.mkldnn
    assert torch.backends.mkldnn.is_available(), "this torch build has no oneDNN: the encoders fall back to F.linear"
    for name in (onednn.LINEAR_POINTWISE, *onednn.SUPPORTS.values()):
        assert hasattr(ops, name), f"torch.ops.mkldnn.{name} is gone: encoders/onednn.py must follow the upgrade"
    assert onednn.AVAILABLE


@pytest.mark.parametrize(
    "post_op, act",
    [
        (("none", ""), lambda y: y),
        (("gelu", "none"), F.gelu),
        (("gelu", "tanh"), lambda y: F.gelu(y, approximate="tanh")),
    ],
)
def test_linear_pointwise_computes_a_linear_then_its_post_op(post_op, act):
    """The operator's signature and meaning: (x, weight, bias, attr, scalars, algorithm) -> attr(x @ W.T + b)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 48), torch.randn(80, 48), torch.randn(80)
    with torch.inference_mode():
        got = getattr(torch.ops.mkldnn, onednn.LINEAR_POINTWISE)(x, weight, bias, *post_op[:1], [], post_op[1])
        via_fence = onednn.linear(x, weight, bias, post_op)
    want = act(F.linear(x, weight, bias))
    assert got.shape == want.shape == via_fence.shape
    assert torch.allclose(got, want, atol=1e-4) and torch.allclose(via_fence, want, atol=1e-4)


def test_the_capability_checks_answer_for_this_cpu():
    assert onednn.computes(torch.float32)
    for dtype, name in onednn.SUPPORTS.items():
        assert onednn.computes(dtype) == getattr(torch.ops.mkldnn, name)()
    assert (torch.bfloat16 in onednn.DTYPES) == onednn.computes(torch.bfloat16)


def test_with_gradients_the_fence_is_f_linear():
    x = torch.randn(2, 8, requires_grad=True)
    weight = torch.randn(4, 8)
    assert not onednn.applies(x * 1)
    assert torch.equal(onednn.linear(x, weight, None), F.linear(x, weight))

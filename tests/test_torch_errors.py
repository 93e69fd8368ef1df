"""Errors of gnnumba.torch: where torch.nn.GroupNorm / F.group_norm refuse an input, gnnumba
refuses it with an exception of torch's class too (and gnnumba's own: ValueError/TypeError,
with a message that names the fix); module attributes changed after construction are
re-checked at every call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gnnumba
import gnnumba.torch as gt

x8 = torch.randn(2, 8, 4)

# (call on torch, the same call on gnnumba, gnnumba's own class, message pattern)
PARITY = [
    pytest.param(lambda g: g(torch.rand(1, 10, 1), 10), ValueError, "more than 1 value",
                 id="one-value-per-group"),
    pytest.param(lambda g: g(torch.rand(1, 4, 1, 1), 4), ValueError, "more than 1 value",
                 id="one-value-per-group-2d"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 4), ValueError, "valid group counts",
                 id="C%G"),
    pytest.param(lambda g: g(torch.rand(6), 2), ValueError, "at least 2 dims", id="1-D"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 2, torch.ones(4)), ValueError,
                 r"weight must have shape \(C,\) = \(6,\)", id="weight-shape"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 2, None, torch.ones(6, 1)), ValueError,
                 "bias must have shape", id="bias-shape"),
    pytest.param(lambda g: g(torch.ones(2, 6, 3, dtype=torch.int64), 2), TypeError, "dtype",
                 id="int-input"),
    pytest.param(lambda g: g(torch.ones(2, 6, 3), 2, torch.ones(6, dtype=torch.int32)),
                 TypeError, "floating-point weight", id="int-weight"),
    pytest.param(lambda g: g(torch.ones(2, 6, 3), 2, torch.ones(6, device="meta")),
                 ValueError, "move it", id="weight-device"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 0), ValueError, "num_groups must be >= 1",
                 id="G=0"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 2.0), TypeError, "num_groups must be an int",
                 id="float-G"),
    pytest.param(lambda g: g(torch.rand(2, 6, 3), 2, eps="abc"), TypeError, "eps",
                 id="str-eps"),
]


@pytest.mark.parametrize("call,own,pattern", PARITY)
def test_refused_like_torch(call, own, pattern):
    with pytest.raises(Exception) as theirs:
        call(F.group_norm)
    with pytest.raises(own, match=pattern) as ours:
        call(gt.group_norm)
    assert isinstance(ours.value, type(theirs.value)), (type(ours.value), type(theirs.value))


@pytest.mark.parametrize("shape,G", [((2, 10, 1), 10), ((1, 10, 2), 10), ((1, 10), 5),
                                     ((1, 4, 1, 1), 2)],
                         ids=["N=2", "spatial=2", "2-channels-per-group", "2x1x1"])
def test_more_than_one_value_per_group_is_fine(shape, G):
    x = torch.randn(shape)
    torch.testing.assert_close(gt.group_norm(x, G), F.group_norm(x, G))


def test_array_level_keeps_computing_one_value_per_group():
    """Only the torch level copies torch's refusal; the array API returns the bias."""
    y = gnnumba.group_norm(np.ones((1, 10, 1), np.float32), 10, bias=np.arange(10.0,
                                                                             dtype=np.float32))
    np.testing.assert_array_equal(y[0, :, 0], np.arange(10.0))


def test_negative_eps_refused():
    with pytest.raises(ValueError, match="eps"):
        gt.group_norm(x8, 2, eps=-1e-5)


# --------------------------------------------------------------------------- module attributes


def _changed(attr, value):
    m = gt.GroupNorm(4, 8)
    m(x8)  # validated state cached for the original attributes
    setattr(m, attr, value)
    return m


@pytest.mark.parametrize("attr,value,exc,pattern", [
    ("weight", nn.Parameter(torch.ones(3)), RuntimeError, r"weight must have shape \(C,\)"),
    ("bias", nn.Parameter(torch.ones(9)), RuntimeError, r"bias must have shape \(C,\)"),
    ("weight", nn.Parameter(torch.ones(8, dtype=torch.int32), requires_grad=False),
     TypeError, "floating-point weight"),
    ("num_groups", 3, ValueError, "valid group counts for C=8"),
    ("num_groups", 0, ZeroDivisionError, "num_groups must be >= 1"),
    ("num_groups", 2.5, TypeError, "num_groups must be an int"),
    ("eps", "abc", TypeError, "eps must be a real number"),
    ("eps", -1.0, ValueError, "eps must be finite and >= 0"),
    ("eps", float("nan"), ValueError, "eps must be finite and >= 0"),
    ("activation", "tanh", ValueError, "unknown activation 'tanh'"),
    ("activation", True, ValueError, "unknown activation True"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_attribute_changed_after_construction_is_checked(attr, value, exc, pattern):
    m = _changed(attr, value)
    with pytest.raises(exc, match=pattern):
        m(x8)
    with torch.no_grad(), pytest.raises(exc, match=pattern):  # the inference route too
        m(x8)


def test_parameter_data_replaced_with_wrong_size_is_checked():
    m = gt.GroupNorm(4, 8)
    m(x8)
    m.weight.data = torch.ones(3)
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(8,\)"):
        m(x8)


def test_valid_changes_take_effect():
    m = gt.GroupNorm(4, 8)
    ref = nn.GroupNorm(4, 8)
    m(x8)
    for attr, value in (("num_groups", 2), ("eps", 0.1), ("eps", 1), ("num_groups", 8)):
        setattr(m, attr, value)
        setattr(ref, attr, value)
        torch.testing.assert_close(m(x8), ref(x8))
    m.activation = "silu"
    torch.testing.assert_close(m(x8), F.silu(ref(x8)))
    m.weight = nn.Parameter(torch.full((8,), 2.0))
    ref.weight = nn.Parameter(torch.full((8,), 2.0))
    torch.testing.assert_close(m(x8), F.silu(ref(x8)))


def test_bool_num_groups_is_not_an_int_even_after_1_was_seen():
    """The cache of validated arguments tells True from 1."""
    gt.group_norm(x8, 1)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        gt.group_norm(x8, True)

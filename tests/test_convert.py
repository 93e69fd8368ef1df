"""convert_batchnorm: every BatchNorm becomes a gnnumba GroupNorm with a sensible group count,
the learned parameters are carried over, and the converted model still trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import gnnumba.torch as gt
from gnnumba.torch import convert_batchnorm, group_count


@pytest.mark.parametrize("C,expected", [
    (1, 1),    # a single channel: one group
    (2, 1),    # 2 groups would be InstanceNorm
    (3, 1),    # prime: only 1 keeps >= 2 channels per group
    (7, 1),
    (16, 8),   # gcd(32, 16) = 16 would be InstanceNorm; 8 keeps 2 channels per group
    (12, 6),
    (48, 24),
    (64, 32),
    (96, 32),
    (512, 32),
])
def test_group_count(C, expected):
    G = group_count(C)
    assert G == expected
    assert C % G == 0 and G <= 32 and (C == 1 or C // G >= 2)


def test_group_count_respects_max_groups():
    assert group_count(64, max_groups=4) == 4
    assert group_count(12, max_groups=5) == 4
    assert group_count(16, max_groups=1) == 1


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus an identity skip."""

    def __init__(self, C):
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(C)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 16, 3, padding=1),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16)
        self.down = nn.Sequential(nn.Conv2d(16, 64, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(64, eps=1e-3), nn.ReLU())
        self.block2 = Block(64)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def test_resnet_like_model_is_fully_converted():
    torch.manual_seed(0)
    model = TinyResNet()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    for bn in bns.values():  # pretend they were trained, to see the values carried over
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    before = {name: (bn.weight.detach().clone(), bn.bias.detach().clone(), bn.eps)
              for name, bn in bns.items()}

    assert convert_batchnorm(model) is model
    modules = dict(model.named_modules())
    assert not any(isinstance(m, _BatchNorm) for m in modules.values())
    expected_groups = {"stem.0": 1, "stem.2": 8, "block1.bn1": 8, "block1.bn2": 8,
                       "down.1": 32, "block2.bn1": 32, "block2.bn2": 32}
    assert set(expected_groups) == set(before)
    for name, G in expected_groups.items():
        gn = modules[name]
        assert type(gn) is gt.GroupNorm and gn.num_groups == G
        w, b, eps = before[name]
        assert torch.equal(gn.weight, w) and torch.equal(gn.bias, b) and gn.eps == eps
        assert gn.weight.requires_grad

    y = model(torch.randn(4, 3, 8, 8))
    assert y.shape == (4, 4) and torch.isfinite(y).all()


def test_converted_model_trains():
    """A few optimizer steps on a fixed synthetic batch (fitting random labels) make the loss
    fall. (The trajectory matches the same model built with torch.nn.GroupNorm.)"""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    labels = torch.randint(0, 4, (16,))
    model = convert_batchnorm(TinyResNet())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses


def test_root_batchnorm_and_other_kinds():
    gn = convert_batchnorm(nn.BatchNorm2d(16))
    assert type(gn) is gt.GroupNorm and gn.num_groups == 8 and gn.num_channels == 16

    bn3 = nn.BatchNorm3d(6, affine=False, eps=1e-4)
    gn3 = convert_batchnorm(bn3)
    assert gn3.num_groups == 3 and not gn3.affine and gn3.weight is None and gn3.eps == 1e-4
    y = gn3(torch.randn(2, 6, 3, 4, 5))
    assert y.shape == (2, 6, 3, 4, 5) and torch.isfinite(y).all()

    sync = convert_batchnorm(nn.Sequential(nn.SyncBatchNorm(64)))
    assert type(sync[0]) is gt.GroupNorm and sync[0].num_groups == 32

    assert convert_batchnorm(nn.BatchNorm1d(1)).num_groups == 1
    seq1d = convert_batchnorm(nn.Sequential(nn.Conv1d(2, 12, 3), nn.BatchNorm1d(12)))
    assert type(seq1d[1]) is gt.GroupNorm and seq1d[1].num_groups == 6
    assert torch.isfinite(seq1d(torch.randn(3, 2, 9))).all()
    assert convert_batchnorm(nn.BatchNorm2d(3)).num_groups == 1


def test_dtype_training_flag_and_max_groups_carried():
    bn = nn.BatchNorm2d(64, dtype=torch.float64).eval()
    gn = convert_batchnorm(bn, max_groups=16)
    assert gn.num_groups == 16 and gn.weight.dtype == torch.float64 and not gn.training


def test_shared_batchnorm_stays_shared():
    bn = nn.BatchNorm2d(8)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    convert_batchnorm(model)
    assert model[0] is model[2] and type(model[0]) is gt.GroupNorm


def test_module_without_batchnorm_is_untouched():
    model = nn.Sequential(nn.Linear(3, 3), nn.GroupNorm(1, 3))
    layers = list(model)
    assert convert_batchnorm(model) is model and list(model) == layers


@pytest.mark.parametrize("kwargs,exc", [({"max_groups": 0}, ValueError),
                                        ({"max_groups": 2.5}, TypeError)])
def test_bad_arguments(kwargs, exc):
    with pytest.raises(exc, match="max_groups"):
        convert_batchnorm(nn.BatchNorm2d(4), **kwargs)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_batchnorm("not a module")


def test_lazy_batchnorm_needs_a_forward_first():
    with pytest.raises(ValueError, match="forward pass"):
        convert_batchnorm(nn.LazyBatchNorm2d())

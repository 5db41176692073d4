"""Optimiser groups (``metalm.train.groups``): each group clipped by its own norm and stepped by its
own optimiser; micro-batch gradients divided and added up."""

from __future__ import annotations

import torch

from metalm.train.groups import OptimGroup, accumulate, apply_groups, clip_groups


def _group(name, values, lr, clip):
    p = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    return p, OptimGroup(name, (p,), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), clip)


def test_each_group_is_clipped_by_its_own_norm_and_stepped_by_its_own_optimizer():
    a, ga = _group("a", [3.0, 4.0], lr=0.5, clip=1.0)  # gradient norm 5: clipped to 1
    b, gb = _group("b", [1.0, 1.0], lr=0.1, clip=100.0)  # gradient norm 0.5: left alone
    a.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)
    norms = apply_groups([ga, gb])
    assert norms == {"a": 5.0, "b": 0.5}
    # torch clips by max_norm / (norm + 1e-6)
    coef = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(a.detach(), torch.tensor([3.0 - 0.5 * 3 * coef, 4.0 - 0.5 * 4 * coef], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 0.3, 1.0 - 0.1 * 0.4], dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert a.grad is None and b.grad is None
    _, none = _group("c", [1.0], lr=1.0, clip=None)
    assert clip_groups([none]) == {"c": 0.0}  # no gradient: nothing measured


def test_accumulate_divides_each_micro_batch_and_adds_them_up():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    for g in ([1.0, 2.0], [3.0, 5.0], [0.5, 0.5]):
        def compute(g=g):
            p.grad = torch.tensor(g, dtype=torch.float64) if p.grad is None else p.grad + 99  # must see None
            return "done"
        assert accumulate([p], 3, compute) == "done"
    expected = [1.0 / 3 + 3.0 / 3 + 0.5 / 3, 2.0 / 3 + 5.0 / 3 + 0.5 / 3]
    assert p.grad.tolist() == expected

"""`learner.distributed` without a process group: batch allocation across ranks, shares, single-process identity.

Pins: `allocate` never hands out more than the target or more than a rank holds, gives each rank its
share first and the rest to ranks with a surplus in rank order; a single process's collectives are the
identity and its `TrainModel` is the bare module.
"""

from __future__ import annotations

import pytest
import torch

from learner.distributed import Distributed, TrainModel, allocate, checksum


@pytest.mark.parametrize(("counts", "target", "expected"), [
    ([2, 2], 4, [2, 2]),          # everyone has its share
    ([4, 0], 4, [4, 0]),          # one rank holds the whole batch (the tail of a run)
    ([3, 1], 4, [3, 1]),          # a surplus covers another rank's shortfall
    ([5, 5], 4, [2, 2]),          # surplus beyond the target stays held
    ([1, 0], 4, [1, 0]),          # a partial batch (deadline passed)
    ([0, 0, 7], 5, [0, 0, 5]),
    ([2, 2, 2], 5, [2, 2, 1]),
])
def test_allocate(counts: list[int], target: int, expected: list[int]) -> None:
    shares = Distributed(world_size=len(counts)).shares(target)
    take = allocate(counts, target, shares)
    assert take == expected
    assert sum(take) == min(target, sum(counts))
    assert all(0 <= t <= c for t, c in zip(take, counts, strict=True))


def test_shares_cover_the_batch() -> None:
    for world in (1, 2, 3, 8):
        for total in (world, 7, 16, 17):
            shares = Distributed(world_size=world).shares(total)
            assert sum(shares) == total and max(shares) - min(shares) <= 1
            assert [Distributed(rank=r, world_size=world).share(total) for r in range(world)] == shares


def test_single_process_is_the_identity() -> None:
    d = Distributed()
    assert not d.enabled and d.is_main
    assert d.sum([1.0, 2.0]) == [1.0, 2.0] and d.max([3.0]) == [3.0] and d.gather(5) == [5]
    module = torch.nn.Linear(3, 2)
    model = TrainModel(module, d, fsdp=False)
    assert model.mode == "single" and model.optimizer_keys == "indices"
    assert model.full_state_dict().keys() == module.state_dict().keys()
    x = torch.ones(1, 3)
    with model.grad_sync(False):
        assert torch.equal(model(input=x), module(x))


def test_checksum_sees_any_change() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.load_state_dict(a.state_dict())
    assert checksum(a) == checksum(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert checksum(a) != checksum(b)

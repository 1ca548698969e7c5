"""PretrainingSampler: Megatron's order, data-parallel slicing, exact resume, argument checks."""

from __future__ import annotations

import itertools

import pytest

from megatron_cola.data import PretrainingSampler


def test_order_and_rank_slices():
    batches = {r: list(PretrainingSampler(26, 0, 3, r, 2)) for r in range(2)}
    assert batches[0][:2] == [[0, 1, 2], [6, 7, 8]]
    assert batches[1][:2] == [[3, 4, 5], [9, 10, 11]]
    assert len(batches[0]) == len(batches[1]) == 4  # 26 // 6, the last 2 samples dropped
    seen = sorted(i for r in range(2) for b in batches[r] for i in b)
    assert seen == list(range(24))


@pytest.mark.parametrize("mbs,dp", [(1, 1), (2, 4), (3, 2), (5, 3)])
def test_resume_yields_exactly_the_remaining_batches(mbs, dp):
    total = 211
    step = mbs * dp
    for rank in range(dp):
        full = list(PretrainingSampler(total, 0, mbs, rank, dp))
        assert len(full) == len(PretrainingSampler(total, 0, mbs, rank, dp))
        for steps_done in (0, 1, 5, len(full) - 1):
            resumed = PretrainingSampler(total, steps_done * step, mbs, rank, dp)
            assert list(resumed) == full[steps_done:]
            assert len(resumed) == len(full) - steps_done
            # interrupting an iterator part-way and resuming continues seamlessly
            it = iter(PretrainingSampler(total, 0, mbs, rank, dp))
            head = list(itertools.islice(it, steps_done))
            assert head + list(PretrainingSampler(total, steps_done * step, mbs, rank, dp)) == full


def test_drop_last_false_keeps_tail():
    r0 = list(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False))
    r1 = list(PretrainingSampler(10, 0, 2, 1, 2, drop_last=False))
    assert r0 == [[0, 1], [4, 5], [8, 9]] and r1 == [[2, 3], [6, 7]]
    assert len(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == 3
    assert len(PretrainingSampler(10, 0, 2, 1, 2, drop_last=False)) == 2
    assert list(PretrainingSampler(11, 0, 2, 1, 2, drop_last=False))[-1] == [10]


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 0, 1, 0, 1), "total_samples"),
        ((10, -1, 1, 0, 1), "consumed_samples must be >= 0"),
        ((10, 10, 1, 0, 1), "exhausted"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((10, 0, 1, 0, 0), "data_parallel_size"),
        ((10, 0, 1, 2, 2), r"data_parallel_rank must be in \[0, 2\)"),
    ],
)
def test_argument_errors(args, match):
    with pytest.raises(ValueError, match=match):
        PretrainingSampler(*args)

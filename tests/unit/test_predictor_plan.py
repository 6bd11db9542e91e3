"""How the predictor covers a batch with its compiled shapes, by their measured cost."""

from __future__ import annotations

from fmnist.model.predictor import buckets, plan


def test_buckets_are_powers_of_two_up_to_and_including_the_maximum() -> None:
    assert buckets(1) == [1]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_plan_splits_a_batch_when_a_big_shape_is_slower_than_small_ones() -> None:
    # XLA's cost by shape is not monotonic: here 64 costs more than four calls of 16.
    costs = {1: 1.0, 4: 2.0, 16: 3.0, 64: 20.0}
    calls = plan(costs, 64)
    assert calls[0] == []
    assert calls[64] == [16, 16, 16, 16]
    assert calls[3] == [4]  # one padded call beats three single ones
    assert sorted(calls[17]) == [1, 16]
    for n, shapes in enumerate(calls):  # every size is covered, by no more than it needs
        assert sum(shapes) >= n and (n == 0 or sum(shapes[:-1]) < n)


def test_plan_pads_to_one_call_when_cost_grows_with_shape() -> None:
    costs = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.3}
    calls = plan(costs, 8)
    assert all(len(calls[n]) == 1 and calls[n][0] >= n for n in range(1, 9))

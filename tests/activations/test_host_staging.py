"""HostStaging: reusable host slots for the harvest's device→host copies (CPU here; on CUDA the
same code copies asynchronously into page-locked slots)."""
from __future__ import annotations

import threading

import pytest
import torch

from activations.host_staging import HostStaging


def test_rows_come_back_equal_and_independent_of_the_slot() -> None:
    staging = HostStaging(1, pin=False)
    a = {9: torch.randn(5, 8).to(torch.float16), 18: torch.randint(-100, 100, (5, 8), dtype=torch.int16)}
    taken = staging.take(staging.stage(a))
    b = {9: torch.randn(5, 8).to(torch.float16), 18: torch.zeros(5, 8, dtype=torch.int16)}
    staging.take(staging.stage(b))  # reuses the only slot: must not change the rows taken before
    for layer in a:
        assert taken[layer].dtype == a[layer].dtype and torch.equal(taken[layer], a[layer])


def test_slots_are_reused_and_grow_only_for_a_larger_batch() -> None:
    staging = HostStaging(2, pin=False)
    for n in (16, 12, 16, 3, 9):  # longest first, as length-bucketed batches come
        staging.take(staging.stage({0: torch.ones(n, 4)}))
    assert staging.allocations == 2  # one per slot, each sized by the first (largest) batch it held
    staging.take(staging.stage({0: torch.ones(40, 4)}))
    assert staging.allocations == 3  # a larger batch grows the slot it lands in


def test_stage_waits_while_every_slot_is_taken() -> None:
    staging = HostStaging(1, pin=False)
    first = staging.stage({0: torch.ones(2, 2)})
    staged_second = threading.Event()

    def second() -> None:
        staging.take(staging.stage({0: torch.zeros(2, 2)}))
        staged_second.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not staged_second.wait(0.2)  # blocked: the only slot still holds the first batch
    assert torch.equal(staging.take(first)[0], torch.ones(2, 2))
    assert staged_second.wait(5)
    thread.join()


def test_zero_slots_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        HostStaging(0, pin=False)

"""The engine's map over work items (``map_items``): order, keys, errors, one cluster or none."""

from __future__ import annotations

import time

import numpy as np
import pytest
from distributed import get_task_stream

from hetero_dask.runtime.engine import map_items

SHARED = np.arange(12.0)


def weighted_sum(shared, item):
    """Later items finish first, so an order taken from completion would show."""
    i, weight = item
    time.sleep(0.02 * (4 - i))
    return float(shared.sum() * weight + i)


ITEMS = [(i, w) for i, w in enumerate((1.0, -2.0, 0.5, 3.0))]
WANT = [66.0 * w + i for i, w in ITEMS]


def test_results_come_back_in_item_order_without_and_with_a_cluster(client2):
    assert map_items(None, weighted_sum, ITEMS, SHARED) == WANT
    assert map_items(client2, weighted_sum, ITEMS, SHARED, key_prefix="toy") == WANT
    assert map_items(client2, weighted_sum, [], SHARED) == []


def test_keys_are_named_by_prefix_token_and_item(client2):
    with get_task_stream(client2) as stream:
        map_items(client2, weighted_sum, ITEMS, SHARED, key_prefix="toy", token="t1")
    keys = {tuple(t["key"]) for t in stream.data if isinstance(t["key"], tuple)}
    assert keys == {("toy-item-t1", i) for i in range(len(ITEMS))}


def test_task_errors_reach_the_driver(client2):
    def broken(shared, item):
        if item == 2:
            raise RuntimeError("item 2 is broken")
        return item

    with pytest.raises(RuntimeError, match="item 2 is broken"):
        map_items(client2, broken, range(4))


def test_a_window_bounds_the_items_drawn_ahead_of_those_done(client2):
    done, done_when_drawn = [], []

    def items():
        for item in ITEMS * 2:
            done_when_drawn.append(len(done))
            yield item

    got = map_items(client2, weighted_sum, items(), SHARED, token="w", window=3, on_done=done.append)
    assert got == WANT * 2
    assert sorted(done) == list(range(8))
    # item i is drawn when fewer than 3 of the i before it are unfinished
    unfinished = [i - n for i, n in enumerate(done_when_drawn)]
    assert max(unfinished) == 2, done_when_drawn
    with pytest.raises(ValueError, match="needs a token"):
        map_items(client2, weighted_sum, iter(ITEMS), SHARED)

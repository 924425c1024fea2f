"""Where a streamed mixture-of-experts block computes: in place or copying, chosen from the
costs measured while serving (``expert_cache_in_place: auto``)."""

from __future__ import annotations

import pytest

from layerstream.engine.placement import MARGIN, Placement
from layerstream.errors import SettingsError

KIB = 1024


def _measured(copy_ns: float, fault_ns: float) -> Placement:
    """``auto``, having seen a copy and a page taken at these costs per byte."""
    placement = Placement()
    placement.copied(KIB, copy_ns * KIB * 1e-9)
    placement.taken(KIB, fault_ns * KIB * 1e-9)
    return placement


def test_auto_copies_until_both_costs_are_measured():
    placement = Placement()
    assert placement.fixed is None and not placement.in_place
    placement.read(hits=100, misses=0)  # nothing copied or taken yet: nothing to compare
    placement.copied(KIB, 1e-6)
    placement.read(hits=100, misses=0)
    assert not placement.in_place and placement.costs() is None


def test_auto_computes_in_place_where_hits_cost_more_copied_than_misses_in_fresh_pages():
    """A page taken costs 6x a copied byte: in place pays above a hit rate of 6/7."""
    placement = _measured(copy_ns=1.0, fault_ns=6.0)
    placement.read(hits=95, misses=5)
    assert placement.in_place
    copying, in_place = placement.costs()
    assert copying > MARGIN * in_place
    for _ in range(400):  # the routing spreads wider: most reads miss
        placement.read(hits=2, misses=8)
    assert not placement.in_place
    # the first read switched to in place; a later one back (reported by the benchmarks)
    assert placement.switched_at[0] == 1 and len(placement.switched_at) == 2
    assert placement.reads == 401


def test_auto_keeps_its_way_while_the_other_is_not_cheaper_by_the_margin():
    placement = _measured(copy_ns=1.0, fault_ns=6.0)
    placement.read(hits=6, misses=1)  # copying 6/7 ns a byte, in place 6/7: even
    assert not placement.in_place


def test_pages_given_back_count_with_those_taken():
    """In place, each expert not kept takes its pages and gives them back: both costs."""
    taking = _measured(copy_ns=1.0, fault_ns=3.5)
    taking.read(hits=8, misses=2)  # copying 0.8 ns a routed byte, in place 0.7: even
    assert not taking.in_place
    cycling = _measured(copy_ns=1.0, fault_ns=3.5)
    cycling.given_back(KIB, 3.5 * KIB * 1e-9)
    cycling.read(hits=19, misses=1)  # copying 0.95, in place 0.35
    assert cycling.in_place
    for _ in range(400):
        cycling.read(hits=8, misses=2)  # 0.8 against 1.4
    assert not cycling.in_place


@pytest.mark.parametrize("mode", [True, False])
def test_a_fixed_way_never_changes(mode):
    placement = Placement(mode)
    placement.copied(KIB, 1.0)
    placement.taken(KIB, 1e-9)
    for hits, misses in ((100, 0), (0, 100)):
        placement.read(hits, misses)
        assert placement.in_place is mode


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_other_values_are_refused(value):
    with pytest.raises(SettingsError, match="expert_cache_in_place"):
        Placement(value)

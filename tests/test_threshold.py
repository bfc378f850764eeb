"""The threshold scan (gradleak.threshold): which strength of a chain it moves, the grid then the
bisection against attacks whose leak stops at a known strength."""

from __future__ import annotations

import math

import pytest

from gradleak.errors import GradleakError
from gradleak.threshold import LeakCriterion, knob_of, scan


def test_the_knob_of_each_chain():
    k = knob_of(("dp-sgd:clip=1,multiplier=1",))
    assert k is not None and k.family.key == "multiplier" and k.value == 1.0
    assert k.at(3.16e-5) == ("dp-sgd:clip=1,multiplier=3.16e-05",)
    k = knob_of(("clip:norm=2", "gaussian:multiplier=0.5", "quantize:bits=16"))
    assert k is not None and k.index == 1 and k.label == "gaussian noise multiplier"
    assert k.at(2.0) == ("clip:norm=2", "gaussian:multiplier=2", "quantize:bits=16")
    k = knob_of(("laplace:scale=0.01",))
    assert k is not None and k.family.key == "scale" and k.at(0.1) == ("laplace:scale=0.1",)
    k = knob_of(("prune:fraction=0.9",))
    assert k is not None and k.family.key == "fraction" and not k.family.log
    assert k.at(0.99) == ("prune:fraction=0.99,method=topk",)
    assert knob_of(("clip:norm=1",)) is None and knob_of(("quantize:bits=8",)) is None


def test_the_leak_criterion():
    c = LeakCriterion()
    assert not c.leaks(19.9, 0.0) and c.leaks(20.0, 0.0) and c.leaks(0.0, 25.0)
    assert LeakCriterion(50).leaks(49, 25) and not LeakCriterion(50).leaks(49, 0)
    for bad in (0, -1, 101):
        with pytest.raises(GradleakError, match="leak threshold"):
            LeakCriterion(bad)


def _step(at: float, calls: list[float]):
    """An attack that leaks fully below strength `at` and not at all from it."""

    def evaluate(v: float):
        calls.append(v)
        return (100.0, 100.0) if v < at else (5.0, 0.0)

    return evaluate


def test_grid_then_bisection_brackets_the_true_threshold():
    knob = knob_of(("dp-sgd:clip=1,multiplier=1",))
    calls: list[float] = []
    result = scan(knob, "exact", True, _step(0.023, calls), bisect=3)
    assert result.status == "stops"
    assert calls[:4] == [1e-4, 1e-3, 1e-2, 0.1]  # weakest first, up to the first that stops
    assert result.below < 0.023 <= result.strength
    assert result.strength / result.below <= 10 ** (1 / 8) * 1.01  # three halvings of a decade (rounded)
    assert len(calls) == 4 + 3  # four grid points, three bisection steps
    assert [p.strength for p in result.points] == calls


def test_the_grid_extends_down_when_its_first_point_stops_the_leak():
    knob = knob_of(("dp-sgd:clip=1,multiplier=1",))
    calls: list[float] = []
    result = scan(knob, "exact", True, _step(3e-6, calls), bisect=2)
    assert calls[:3] == [1e-4, 1e-5, 1e-6]
    assert result.status == "stops" and result.below < 3e-6 <= result.strength
    calls = []
    floor = scan(knob, "exact", True, _step(1e-12, calls), bisect=2)
    assert floor.status == "stops" and floor.below is None and floor.strength == 1e-7  # at most 1e-7
    assert calls == [1e-4, 1e-5, 1e-6, 1e-7, 0.0] and "at most" in floor.note  # leaks without noise
    calls = []
    clipped = scan(knob, "exact", True, _step(-1.0, calls), bisect=2)  # the clip alone stops it
    assert clipped.status == "stops" and clipped.strength == 0.0 and "not the noise" in clipped.note
    assert calls == [1e-4, 1e-5, 1e-6, 1e-7, 0.0]


def test_no_leak_leaks_throughout_and_failed_runs():
    knob = knob_of(("gaussian:sigma=0.001",))
    calls: list[float] = []
    assert scan(knob, "tag", False, _step(1.0, calls)).status == "no-leak" and calls == []
    result = scan(knob, "exact", True, _step(math.inf, calls))
    assert result.status == "leaks" and result.strength is None and result.below == 1.0
    assert len(calls) == len(knob.family.grid)
    failed = scan(knob, "exact", True, lambda v: None)
    assert failed.status == "failed" and "failed" in failed.note and failed.points[0].leaks is None


def test_pruning_scans_the_fraction():
    knob = knob_of(("prune:fraction=0.5",))
    calls: list[float] = []
    result = scan(knob, "exact", True, _step(0.95, calls), bisect=2)
    assert calls[:4] == [0.1, 0.5, 0.9, 0.99]
    assert result.status == "stops" and result.below < 0.95 <= result.strength < 0.99

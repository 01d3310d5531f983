"""benchmark_step.step_timeline: per-step device span and busy time from a trace's events."""

from __future__ import annotations

import pytest


def test_span_and_busy_time_of_each_step(load_script):
    step_timeline = load_script("benchmark_step").step_timeline
    # Two calls of a step with three events each (ns): an argument copy, then two kernels that overlap by 10 ns
    # after an idle 100 ns; the second call's kernels run longer.
    first = [(0, 20), (120, 170), (160, 200)]
    second = [(1000, 1020), (1120, 1190), (1180, 1300)]
    timeline = step_timeline(second + first, steps=2)  # events arrive unordered across lines
    spans, busy = (200, 300), (20 + 80, 20 + 180)
    assert timeline == pytest.approx({"device_span_us": sum(spans) / 2 / 1e3, "device_busy_us": sum(busy) / 2 / 1e3})


def test_events_that_do_not_split_evenly_give_nothing(load_script):
    step_timeline = load_script("benchmark_step").step_timeline
    assert step_timeline([(0, 1), (2, 3), (4, 5)], steps=2) == {}
    assert step_timeline([], steps=3) == {}

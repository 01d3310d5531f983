"""Piecewise-linear tables of measured seconds: `Table1D` over one argument, `Table2D` bilinear over a full
grid. Between measured points they interpolate; beyond them they extrapolate the end segment, clamped at
zero. Lookups cost a bisection and a few multiplications, since the scheduler makes hundreds per step.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from typing import Any


def _checked_axis(values: Any, name: str) -> tuple[float, ...]:
    axis = tuple(float(v) for v in values)
    if not axis:
        raise ValueError(f"{name}: needs at least one point")
    if not all(math.isfinite(v) for v in axis):
        raise ValueError(f"{name}: points must be finite, got {axis}")
    if any(b <= a for a, b in zip(axis, axis[1:])):
        raise ValueError(f"{name}: points must be strictly increasing, got {axis}")
    return axis


def _checked_seconds(values: Any, length: int, name: str) -> tuple[float, ...]:
    seconds = tuple(float(v) for v in values)
    if len(seconds) != length:
        raise ValueError(f"{name}: has {len(seconds)} values for {length} points")
    if not all(math.isfinite(v) and v >= 0.0 for v in seconds):
        raise ValueError(f"{name}: times must be finite and non-negative, got {seconds}")
    return seconds


def _segment_slopes(points: tuple[float, ...], seconds: tuple[float, ...]) -> tuple[float, ...]:
    if len(points) == 1:
        return (0.0,)
    return tuple((s1 - s0) / (p1 - p0) for p0, p1, s0, s1 in zip(points, points[1:], seconds, seconds[1:]))


@dataclasses.dataclass(frozen=True)
class Table1D:
    """Seconds measured at increasing points; piecewise linear between them."""

    points: tuple[float, ...]
    seconds: tuple[float, ...]
    name: str = dataclasses.field(default="table", compare=False)

    def __post_init__(self) -> None:
        points = _checked_axis(self.points, f"{self.name}.points")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "seconds", _checked_seconds(self.seconds, len(points), f"{self.name}.seconds"))
        object.__setattr__(self, "_slopes", _segment_slopes(points, self.seconds))
        object.__setattr__(self, "_last_segment", max(len(points) - 1, 1))

    def __call__(self, x: float) -> float:
        # Searching only the inner points clamps the segment to the first or last one outside the table.
        i = bisect_right(self.points, x, 1, self._last_segment) - 1
        value = self.seconds[i] + self._slopes[i] * (x - self.points[i])
        return value if value > 0.0 else 0.0

    def to_dict(self) -> dict[str, list[float]]:
        return {"points": list(self.points), "seconds": list(self.seconds)}


@dataclasses.dataclass(frozen=True)
class Table2D:
    """Seconds measured on a full grid `seconds[row][column]`; bilinear between grid points."""

    rows: tuple[float, ...]
    columns: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]
    name: str = dataclasses.field(default="table", compare=False)

    def __post_init__(self) -> None:
        rows = _checked_axis(self.rows, f"{self.name}.rows")
        columns = _checked_axis(self.columns, f"{self.name}.columns")
        if len(self.seconds) != len(rows):
            raise ValueError(f"{self.name}.seconds: has {len(self.seconds)} rows for {len(rows)} row points")
        seconds = tuple(_checked_seconds(row, len(columns), f"{self.name}.seconds[{i}]")
                        for i, row in enumerate(self.seconds))
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "seconds", seconds)
        object.__setattr__(self, "_slopes", tuple(_segment_slopes(columns, row) for row in seconds))
        object.__setattr__(self, "_inverse_row_gaps", tuple(1.0 / (b - a) for a, b in zip(rows, rows[1:])) or (0.0,))
        object.__setattr__(self, "_last_row_segment", max(len(rows) - 1, 1))
        object.__setattr__(self, "_last_column_segment", max(len(columns) - 1, 1))

    def __call__(self, row: float, column: float) -> float:
        r = bisect_right(self.rows, row, 1, self._last_row_segment) - 1
        c = bisect_right(self.columns, column, 1, self._last_column_segment) - 1
        r_high = r + 1 if len(self.rows) > 1 else r
        offset = column - self.columns[c]
        low = self.seconds[r][c] + self._slopes[r][c] * offset
        high = self.seconds[r_high][c] + self._slopes[r_high][c] * offset
        value = low + (high - low) * (row - self.rows[r]) * self._inverse_row_gaps[r]
        return value if value > 0.0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "columns": list(self.columns), "seconds": [list(r) for r in self.seconds]}

"""Interpolation tables: exact at their points, linear between, extrapolated and clamped beyond, and bad
input rejected with the field's name."""

import math

import pytest

from neo_jax.cost_tables import Table1D, Table2D


def test_table1d_interpolates_between_points_and_hits_them_exactly():
    table = Table1D((1, 3, 7), (1.0, 3.0, 4.0))
    assert table(1) == 1.0 and table(3) == 3.0 and table(7) == 4.0
    assert table(2) == pytest.approx(2.0)
    assert table(5) == pytest.approx(3.5)


def test_table1d_extrapolates_end_segments_and_clamps_at_zero():
    table = Table1D((10, 20, 30), (1.0, 2.0, 2.5))
    assert table(50) == pytest.approx(3.5)       # last slope 0.05 per point
    assert table(5) == pytest.approx(0.5)        # first slope 0.1 per point
    assert table(-100) == 0.0                    # 1.0 - 11.0 would be negative
    assert Table1D((4,), (2.0,))(1e9) == 2.0     # one point: constant


def test_table2d_is_bilinear_and_extrapolates_both_axes():
    table = Table2D((1, 3), (0, 10), ((0.0, 1.0), (2.0, 5.0)))
    assert table(1, 0) == 0.0 and table(3, 10) == 5.0
    assert table(2, 5) == pytest.approx((0.0 + 1.0 + 2.0 + 5.0) / 4)
    assert table(1, 20) == pytest.approx(2.0)
    assert table(5, 10) == pytest.approx(9.0)
    assert table(-5, 0) == 0.0
    assert Table2D((1,), (0, 10), ((0.0, 1.0),))(50, 5) == pytest.approx(0.5)


@pytest.mark.parametrize("make, message", [
    (lambda: Table1D((), (), name="linear"), "linear.points: needs at least one point"),
    (lambda: Table1D((1, 1), (0.0, 1.0)), "strictly increasing"),
    (lambda: Table1D((1, 2), (0.0,)), "has 1 values for 2 points"),
    (lambda: Table1D((1, 2), (0.0, -1.0)), "non-negative"),
    (lambda: Table1D((1, math.nan), (0.0, 1.0)), "finite"),
    (lambda: Table2D((1, 2), (0, 1), ((0.0, 1.0),)), "has 1 rows for 2 row points"),
    (lambda: Table2D((1,), (0, 1), ((0.0,),)), r"seconds\[0\]: has 1 values"),
])
def test_tables_reject_bad_input_naming_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()

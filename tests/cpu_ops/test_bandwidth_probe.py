"""The read-bandwidth probe the benchmark measures the op against."""

import pytest

from neo_jax import cpu_ops


def test_reports_one_positive_figure_per_repeat():
    figures = cpu_ops.read_bandwidth_probe(num_bytes=8 << 20, repeats=3)
    assert len(figures) == 3 and all(gbps > 0 for gbps in figures)


@pytest.mark.parametrize("num_bytes,repeats,message", [(1000, 1, "num_bytes"), (8 << 20, 0, "repeats")])
def test_rejects_bad_arguments(num_bytes, repeats, message):
    with pytest.raises(ValueError, match=message):
        cpu_ops.read_bandwidth_probe(num_bytes=num_bytes, repeats=repeats)

"""benchmark_swap.py: its row split and an end-to-end run on the tiny model (CPU backend handlers)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("total_rows,row_bytes,call_bytes", [(100, 64, 4096), (100, 64, 1 << 20), (7, 1000, 10)])
def test_row_calls_cover_every_row_once_within_the_byte_cap(load_script, total_rows, row_bytes, call_bytes):
    pieces = load_script("benchmark_swap").row_calls(total_rows, row_bytes, call_bytes)
    covered = [row for piece in pieces for row in range(total_rows)[piece]]
    assert covered == list(range(total_rows))
    for piece in pieces:
        rows = piece.stop - piece.start
        assert rows == 1 or rows * (row_bytes + 8) + 4 * 256 <= call_bytes


def test_times_every_part_and_checks_the_stored_rows(load_script, tmp_path):
    output = tmp_path / "swap.json"
    results = load_script("benchmark_swap").main([
        "--model", "tiny", "--dtype", "float32", "--context", "24", "--block-size", "4", "--requests", "1", "2",
        "--call-mb", "0.01", "1", "--iters", "1", "--output-json", str(output)])
    assert output.exists()
    assert [row["requests"] for row in results["rows"]] == [1, 2]
    for row in results["rows"]:
        assert row["append_kv_s"] > 0 and row["moved_bytes"] > 0
        small, large = row["calls"]
        assert small["calls"] > 1 and large["calls"] == 1
        for cell in row["calls"]:
            assert cell["stored_rows_match"]
            assert min(cell["store_s"], cell["store_synced_s"], cell["store_repeated_s"], cell["load_s"]) > 0

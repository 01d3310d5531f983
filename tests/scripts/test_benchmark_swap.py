"""benchmark_swap.py end to end on the tiny model (CPU backend handlers)."""

from __future__ import annotations


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

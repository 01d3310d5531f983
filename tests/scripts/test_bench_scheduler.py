"""The scheduler's Python-cost benchmark: every policy mix is timed and written with the machine and commit."""

from __future__ import annotations

import json


def test_times_every_policy_mix(load_script, tmp_path):
    script = load_script("bench_scheduler")
    path = tmp_path / "scheduler.json"
    script.main(["--num-running", "32", "--steps", "20", "--scenarios", "3", "--output-json", str(path)])
    results = json.loads(path.read_text())
    assert set(results["plan_step"]) == set(script.MIXES)
    for summary in list(results["plan_step"].values()) + [results["build_decode_views"]]:
        assert 0 < summary["p50_us"] <= summary["p99_us"]
    assert results["num_running"] == 32 and results["machine"]["commit"] and results["machine"]["command"]

"""profile.py on the CPU backend: the table it writes is where load_cost_model looks, and it interpolates."""

import warnings

import jax
import pytest

from neo_jax.cost_model import CostModel, MachineId, load_cost_model
from neo_jax.models.config import PRESETS


def test_quick_profile_writes_a_table_the_engine_loads(load_script, tmp_path):
    profile = load_script("profile")
    written = profile.main(["--model", "tiny", "--quick", "--block-size", "8", "--context-len", "32",
                            "--cost-table-dir", str(tmp_path / "tables"), "--output", str(tmp_path / "copy.json")])
    machine = MachineId.current(jax.devices()[0].device_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_cost_model(PRESETS["tiny"], model="tiny", machine=machine, block_size=8,
                                 directory=tmp_path / "tables")
    assert loaded == written == CostModel.load(tmp_path / "copy.json")
    assert loaded.num_layers == PRESETS["tiny"].num_layers and loaded.dtype == "float32"

    (low, high), (t_low, t_high) = loaded.linear.points, loaded.linear.seconds
    assert t_low > 0 and t_high > 0
    assert loaded.linear_time((low + high) / 2) == pytest.approx((t_low + t_high) / 2)
    assert loaded.gpu_decode_attention.points == (32.0,)        # one request of --context-len tokens
    assert loaded.gpu_decode_attention_time(32) > 0 and loaded.prefill_attention_time(16, 16) > 0
    cpu = loaded.cpu_decode_attention
    assert cpu.rows == (1.0, 4.0) and len(cpu.seconds) == 2 and all(t > 0 for row in cpu.seconds for t in row)
    corner_mean = sum(sum(row) for row in cpu.seconds) / 4
    assert loaded.cpu_decode_attention_time(2.5, 160) == pytest.approx(corner_mean)
    assert loaded.handoff.points == (1.0,) and loaded.handoff_time(1) >= 0.0


def test_profile_rejects_bad_sizes(load_script, tmp_path):
    with pytest.raises(SystemExit):
        load_script("profile").main(["--model", "tiny", "--block-size", "0", "--cost-table-dir", str(tmp_path)])

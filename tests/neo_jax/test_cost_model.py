"""The cost model: its queries, JSON round trip, finding the table of this model and machine, and the fallback."""

import json
import math
import warnings

import pytest

from neo_jax import cpu_ops
from neo_jax.cost_model import (
    CostModel, CostTableMissingWarning, HardwareSpec, MachineId, cost_table_path, fallback_cost_model, load_cost_model,
)
from neo_jax.cost_tables import Table1D, Table2D
from neo_jax.models.config import ModelConfig

MACHINE = MachineId(cpu_model="Test Xeon", cpu_threads=16, gpu_name="Test GPU")
CONFIG = ModelConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                     num_kv_heads=2, head_dim=64, dtype="bfloat16")


def measured_model(model: str = "tiny", machine: MachineId = MACHINE) -> CostModel:
    return CostModel(
        model=model, machine=machine, dtype="bfloat16", block_size=16, num_layers=4,
        linear=Table1D((1, 100, 1000), (1e-3, 1e-3, 10e-3)),
        prefill_attention=Table1D((0, 1000), (0.0, 1e-3)),
        gpu_decode_attention=Table1D((0, 1e6), (0.0, 1e-3)),
        cpu_decode_attention=Table2D((1, 101), (0, 1e5), ((0.0, 1e-3), (1e-4, 2e-3))),
        handoff=Table1D((1,), (5e-5,)),
    )


def test_cost_model_queries_are_zero_for_empty_work():
    model = measured_model()
    assert model.linear_time(0) == model.cpu_decode_attention_time(0, 0) == model.handoff_time(0) == 0.0
    assert model.gpu_decode_attention_time(0) == model.prefill_attention_time(0, 10) == 0.0
    assert model.handoff_time(3) == 5e-5


def test_prefill_chunk_costs_the_causal_work_it_does():
    model = measured_model()
    whole = model.prefill_attention_time(800, 800)
    assert whole == pytest.approx(model.prefill_attention(800))
    first_half, second_half = model.prefill_attention_time(400, 400), model.prefill_attention_time(400, 800)
    assert first_half < second_half < whole
    # Work grows with the square of the length: the two halves of 800 tokens weigh 1 : 3.
    assert model.prefill_attention(math.sqrt(400 * 1200)) == pytest.approx(second_half)


def test_linear_knee_is_the_end_of_the_flat_part():
    assert measured_model().linear_knee_tokens == pytest.approx(100.0)


def test_json_round_trip_is_lossless(tmp_path):
    model = measured_model()
    path = model.save(tmp_path / "sub" / "table.json")
    assert CostModel.load(path) == model
    assert json.loads(path.read_text())["tables"]["cpu_decode_attention"]["rows"] == [1.0, 101.0]


def test_json_errors_name_the_missing_field(tmp_path):
    data = measured_model().to_dict()
    del data["tables"]["handoff"]["seconds"]
    with pytest.raises(ValueError, match="tables.handoff.seconds"):
        CostModel.from_dict(data)
    data = measured_model().to_dict() | {"schema_version": 99}
    with pytest.raises(ValueError, match="schema_version 99"):
        CostModel.from_dict(data)
    with pytest.raises(ValueError, match="dtype"):
        CostModel.from_dict(measured_model().to_dict() | {"dtype": "int4"})


def test_load_picks_the_table_of_this_model_and_machine(tmp_path):
    other_machine = MachineId("Other CPU", 8, "Test GPU")
    measured_model(machine=other_machine).save(cost_table_path(tmp_path, "tiny", "bfloat16", 16, other_machine))
    mine = measured_model()
    mine.save(cost_table_path(tmp_path, "tiny", "bfloat16", 16, MACHINE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16, directory=tmp_path)
    assert loaded == mine


def test_load_warns_with_what_it_found_and_falls_back(tmp_path):
    measured_model(model="other-model").save(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.warns(CostTableMissingWarning) as caught:
        loaded = load_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16, directory=tmp_path)
    message = str(caught[0].message)
    assert "no cost table for model 'tiny'" in message and "'other-model'" in message
    assert "broken.json: unreadable" in message and "scripts/profile.py" in message
    assert loaded == fallback_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16)
    with pytest.warns(CostTableMissingWarning, match="no tables"):
        load_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16, directory=tmp_path / "absent")


def test_fallback_follows_the_roofline_of_its_hardware():
    hardware = HardwareSpec(gpu_flops=100e12, gpu_memory_bandwidth=1e12, cpu_memory_bandwidth=50e9,
                            host_link_bandwidth=20e9, handoff_latency_s=80e-6)
    model = fallback_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16, hardware=hardware)
    assert model.linear_knee_tokens == pytest.approx(2 * 100e12 / (2 * 1e12))   # bf16 bytes x FLOP/s / 2 bandwidth
    assert model.linear_time(1) == pytest.approx(model.linear_time(50))         # weight reads dominate
    assert model.linear_time(4000) == pytest.approx(2 * model.linear_time(2000))
    kv_bytes_per_token = 2 * 2 * 64 * 2
    assert model.cpu_decode_attention_time(7, 10_000) == pytest.approx(10_000 * kv_bytes_per_token / 50e9)
    assert model.gpu_decode_attention_time(10_000) == pytest.approx(10_000 * kv_bytes_per_token / 1e12)
    assert model.handoff_time(1) > 80e-6 and model.handoff_time(64) > model.handoff_time(1)
    assert model.prefill_attention_time(2048, 2048) > 3 * model.prefill_attention_time(1024, 1024)


def test_fallback_over_several_gpus_splits_only_the_gpu_work():
    one = fallback_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16)
    two = fallback_cost_model(CONFIG, model="tiny", machine=MACHINE, block_size=16,
                              hardware=HardwareSpec().over_gpus(2))
    assert two.linear_time(4000) == pytest.approx(one.linear_time(4000) / 2)
    assert two.gpu_decode_attention_time(10_000) == pytest.approx(one.gpu_decode_attention_time(10_000) / 2)
    assert two.cpu_decode_attention_time(7, 10_000) == one.cpu_decode_attention_time(7, 10_000)
    assert two.handoff_time(8) == one.handoff_time(8)


def test_table_path_is_a_plain_file_name_per_model_and_machine(tmp_path):
    path = cost_table_path(tmp_path, "meta/llama 3", "bfloat16", 16, MachineId("Intel(R) Xeon(R) @ 2GHz", 16, "H100"))
    assert path.parent == tmp_path and path.suffix == ".json"
    assert "/" not in path.name and " " not in path.name and "llama-3" in path.name


def test_current_machine_reads_this_host():
    machine = MachineId.current("Test GPU")
    assert machine.cpu_threads == cpu_ops.num_threads() and machine.cpu_model and machine.gpu_name == "Test GPU"
    assert MachineId.current("Test GPU", cpu_threads=3).cpu_threads == 3

"""LLM.generate end to end on the CPU backend: greedy equality with transformers, batching independence,
preemption and chunked prefill, seeded sampling, stop rules, bad prompts, and no recompilation after warm-up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from tiny_engine import ENGINE_OPTIONS
from neo_jax import LLM, SamplingParams
from neo_jax.model_runner import num_step_compilations

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPT_LENGTHS = (5, 17, 40, 3, 70, 9)


def random_prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=n).tolist() for n in lengths]


def transformers_greedy(model: transformers.LlamaForCausalLM, prompt: list[int], num_tokens: int) -> list[int]:
    config = transformers.GenerationConfig(max_new_tokens=num_tokens, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_batch_equals_transformers_and_one_prompt_at_a_time(hf_llama, hf_llm):
    prompts = random_prompts(PROMPT_LENGTHS)
    batched = hf_llm.generate(prompts, GREEDY, use_tqdm=False)
    expected = [transformers_greedy(hf_llama[1], p, GREEDY.max_tokens) for p in prompts]
    assert token_ids(batched) == expected
    assert [o.prompt_token_ids for o in batched] == prompts
    assert all(o.outputs[0].finish_reason == "length" and o.error is None for o in batched)
    alone = [hf_llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert alone == expected


def test_preemption_and_chunked_prefill_keep_outputs_identical(hf_llama, hf_llm):
    # 8 requests of about 110 tokens need ~110 blocks of 8 tokens; the pool has 95. Prompts exceed the budget
    # of 64 tokens per step, so they are prefilled in chunks.
    prompts = random_prompts((100, 90, 104, 95, 88, 99, 85, 103), seed=1)
    before = dataclasses.replace(hf_llm.engine.scheduler.stats)
    outputs = hf_llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = hf_llm.engine.scheduler.stats
    assert stats.num_preemptions > before.num_preemptions
    assert stats.num_partial_prefills > before.num_partial_prefills
    assert token_ids(outputs) == [transformers_greedy(hf_llama[1], p, GREEDY.max_tokens) for p in prompts]
    assert hf_llm.engine.pool.num_free_blocks == hf_llm.engine.pool.num_usable_blocks


def test_no_step_compiles_after_warm_up(hf_llm):
    hf_llm.generate(random_prompts(PROMPT_LENGTHS, seed=2), GREEDY, use_tqdm=False)
    compiled = num_step_compilations()
    outputs = hf_llm.generate(random_prompts(PROMPT_LENGTHS, seed=3), GREEDY, use_tqdm=False)
    assert num_step_compilations() == compiled
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outputs)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(hf_llm):
    prompts = random_prompts((6, 30, 11), seed=4)
    seeded = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, seed=1234, max_tokens=10,
                            ignore_eos=True)
    unseeded = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    batch = hf_llm.generate(prompts, [seeded, unseeded, seeded], use_tqdm=False)
    alone = hf_llm.generate(prompts[0], seeded, use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == batch[0].outputs[0].token_ids
    other_seed = hf_llm.generate(prompts[0], SamplingParams(**{**vars(seeded), "seed": 99}), use_tqdm=False)[0]
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    greedy = hf_llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                             use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_completions_differ_and_each_is_reproducible(hf_llm):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = hf_llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    again = hf_llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert [c.index for c in first.outputs] == [0, 1]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]


def test_stop_tokens_min_tokens_and_max_tokens(hf_llm):
    prompt = random_prompts((8,), seed=5)[0]
    free_run = hf_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = free_run[3]
    first_index = free_run.index(stop_at)
    stopped = hf_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                              use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free_run[:first_index + 1]
    suppressed = hf_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                          stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert suppressed.finish_reason == "length" and stop_at not in suppressed.token_ids
    short = hf_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert short.token_ids == free_run[:2] and short.finish_reason == "length"


def test_eos_stops_unless_ignored(hf_llm, monkeypatch):
    prompt = random_prompts((8,), seed=6)[0]
    free_run = hf_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setattr(type(hf_llm.engine), "eos_token_ids", property(lambda self: (free_run[1],)))
    stopped = hf_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free_run[:free_run.index(free_run[1]) + 1]
    assert hf_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == free_run


def test_requests_stop_at_max_model_len(hf_llm):
    prompt = random_prompts((ENGINE_OPTIONS["max_model_len"] - 3,), seed=7)[0]
    output = hf_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(output.token_ids) == 3 and output.finish_reason == "length"


def test_bad_prompts_fail_alone(hf_llm, caplog):
    good = [5, 6, 7, 8]
    prompts = [good, [], list(range(3, 3 + ENGINE_OPTIONS["max_model_len"] + 1)), [5, 512], [5, -1], good]
    with caplog.at_level("WARNING"):
        outputs = hf_llm.generate(prompts, GREEDY, use_tqdm=False)
    reasons = [o.outputs[0].finish_reason for o in outputs]
    assert reasons == ["length", "error", "error", "error", "error", "length"]
    assert "empty" in outputs[1].error and "max_model_len=128" in outputs[2].error
    assert "512" in outputs[3].error and "-1" in outputs[4].error
    assert outputs[0].outputs[0].token_ids == outputs[5].outputs[0].token_ids
    assert len(caplog.records) == 4


def test_string_prompts_without_a_tokenizer_are_refused(hf_llm):
    with pytest.raises(ValueError, match="prompts: .* has no tokenizer.json"):
        hf_llm.generate("hello", GREEDY, use_tqdm=False)


def test_sampling_params_must_match_the_prompts(hf_llm):
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        hf_llm.generate([[5], [6]], [GREEDY], use_tqdm=False)


@pytest.mark.parametrize("option, value", [("policy", "fastest"), ("cpu_kv_cache_gb", -1.0), ("max_num_seqs", 0),
                                           ("block_size", -4), ("gpu_memory_utilization", 1.5), ("dtype", "int8"),
                                           ("num_gpu_blocks", 1), ("gpu_kv_cache_gb", 0.0), ("swap_space", 4)])
def test_bad_engine_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        LLM("tiny", **{option: value})


def test_a_kv_budget_too_small_for_max_model_len_raises():
    with pytest.raises(ValueError, match="max_model_len"):
        LLM("tiny", max_model_len=128, block_size=8, num_gpu_blocks=8)


def test_prompts_of_the_wrong_type_fail_alone_and_leave_the_engine_clean(hf_llm):
    good = [5, 6, 7, 8]
    outputs = hf_llm.generate([good, None, 3.5, [1.5], np.zeros((2, 2), np.int32), good], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "error", "error", "error", "error", "length"]
    assert "None is neither" in outputs[1].error and "3.5 is neither" in outputs[2].error
    assert "1.5 is not a token id" in outputs[3].error and "(2, 2)" in outputs[4].error
    with pytest.raises(ValueError, match="has no tokenizer.json"):  # refused before `good` is queued
        hf_llm.generate([good, "hello"], GREEDY, use_tqdm=False)
    assert not hf_llm.engine.has_unfinished_requests()
    assert token_ids(hf_llm.generate([good], GREEDY, use_tqdm=False)) == [outputs[0].outputs[0].token_ids]


def test_token_id_arrays_are_prompts(hf_llm):
    prompts = random_prompts((6, 9), seed=3)
    expected = token_ids(hf_llm.generate(prompts, GREEDY, use_tqdm=False))
    assert token_ids(hf_llm.generate(np.array(prompts[0]), GREEDY, use_tqdm=False)) == expected[:1]
    assert token_ids(hf_llm.generate([np.array(p, np.int32) for p in prompts], GREEDY, use_tqdm=False)) == expected
    square = np.array([prompts[0], prompts[0]])
    assert token_ids(hf_llm.generate(square, GREEDY, use_tqdm=False)) == [expected[0], expected[0]]


def test_requests_queued_on_the_engine_finish_without_breaking_generate(hf_llm):
    queued = hf_llm.engine.add_request([5, 6, 7], GREEDY)
    outputs = hf_llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    assert queued.finish_reason == "length" and queued.output_token_ids == outputs[0].outputs[0].token_ids

"""Device sampling: filters, suppression, greedy rows, and per-row keys independent of the batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.sampler import SamplingBatch, sample
from neo_jax.sampling_params import SamplingParams

VOCAB = 64
sample_jit = jax.jit(sample)


def rows(num_rows: int, **columns) -> SamplingBatch:
    defaults = dict(temperatures=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, output_indices=0)
    dtypes = dict(temperatures=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32, seeds=np.uint32,
                  output_indices=np.int32)
    arrays = {name: np.broadcast_to(np.asarray(columns.get(name, value), dtypes[name]), (num_rows,)).copy()
              for name, value in defaults.items()}
    suppressed = np.asarray(columns.get("suppressed_token_ids", np.full((num_rows, 4), -1)), np.int32)
    return SamplingBatch(**arrays, suppressed_token_ids=suppressed)


def logits(num_rows: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(num_rows, VOCAB)) * 3, jnp.float32)


def test_filters_that_keep_one_token_equal_greedy():
    values = logits(6)
    greedy = np.argmax(values, axis=-1)
    batch = rows(6, top_k=[1, 0, 0, 1, 0, 0], top_p=[1, 1e-6, 1, 1, 1e-6, 1], min_p=[0, 0, 1, 0, 0, 1],
                 seeds=np.arange(6), temperatures=[1.0, 1.0, 1.0, 5.0, 5.0, 5.0])
    np.testing.assert_array_equal(sample_jit(values, batch), greedy)


def test_temperature_zero_is_greedy_and_suppressed_tokens_are_never_sampled():
    values = logits(3)
    ranked = np.argsort(-np.asarray(values), axis=-1)
    suppressed = np.full((3, 4), -1)
    suppressed[1, :2] = ranked[1, :2]
    tokens = np.asarray(sample_jit(values, rows(3, temperatures=0.0, suppressed_token_ids=suppressed)))
    np.testing.assert_array_equal(tokens, [ranked[0, 0], ranked[1, 2], ranked[2, 0]])
    sampled = {int(sample_jit(values, rows(3, seeds=seed, suppressed_token_ids=suppressed))[1]) for seed in range(30)}
    assert not sampled & set(ranked[1, :2])


def test_top_k_and_top_p_keep_sampling_within_their_sets():
    values = logits(1)
    order = np.argsort(-np.asarray(values[0]))
    probs = np.asarray(jax.nn.softmax(values[0]))[order]
    nucleus = order[:np.searchsorted(np.cumsum(probs), 0.5) + 1]
    seen_k, seen_p = set(), set()
    for seed in range(60):
        seen_k.add(int(sample_jit(values, rows(1, top_k=3, seeds=seed))[0]))
        seen_p.add(int(sample_jit(values, rows(1, top_p=0.5, seeds=seed))[0]))
    assert seen_k <= set(order[:3]) and len(seen_k) > 1
    assert seen_p <= set(nucleus)


def test_min_p_drops_unlikely_tokens():
    values = jnp.asarray([[4.0, 3.9, 0.0] + [-10.0] * (VOCAB - 3)], jnp.float32)
    tokens = {int(sample_jit(values, rows(1, min_p=0.5, seeds=seed))[0]) for seed in range(40)}
    assert tokens == {0, 1}


def test_a_row_samples_the_same_token_alone_or_in_any_batch_position():
    values = logits(5, seed=1)
    batch = rows(5, seeds=[11, 12, 13, 14, 15], output_indices=[0, 3, 1, 7, 2], temperatures=[1.0, 0.0, 0.8, 1.3, 1.0])
    together = np.asarray(sample_jit(values, batch))
    for row in range(5):
        alone = rows(1, seeds=batch.seeds[row], output_indices=batch.output_indices[row],
                     temperatures=batch.temperatures[row])
        assert int(sample_jit(values[row:row + 1], alone)[0]) == together[row]
    shifted = rows(5, seeds=[11, 12, 13, 14, 15], output_indices=[1, 4, 2, 8, 3], temperatures=1.0)
    assert not np.array_equal(np.asarray(sample_jit(values, shifted)), together)


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("top_k", -2), ("top_k", 2.0), ("top_p", 0.0), ("top_p", 1.1),
    ("min_p", -0.1), ("min_p", 1.5), ("seed", -1), ("seed", 2**32), ("max_tokens", 0), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 17), ("stop_token_ids", [3, -4])])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("all_greedy", [True, False])
def test_only_a_batch_not_known_greedy_compiles_random_sampling(all_greedy):
    """No lax.cond decides it on the device (on a GPU its predicate would make the host wait mid-step)."""
    batch = dataclasses.replace(rows(3, temperatures=0.0), all_greedy=all_greedy)
    program = str(jax.make_jaxpr(sample)(logits(3), batch))  # nested jaxprs included
    assert " cond[" not in program
    assert (" sort[" in program) != all_greedy
    np.testing.assert_array_equal(sample_jit(logits(3), batch), np.argmax(logits(3), axis=-1))

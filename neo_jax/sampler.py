"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p, suppressed tokens, per-row keys.

Each row's random key is `fold_in(key(seed), output_index)` and every row is sampled on its own (vmap), so a
request's tokens do not depend on which rows share its batch, nor on its row, nor on the padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.config import power_of_two_at_least
from neo_jax.sequence import Request

MIN_SUPPRESSED_WIDTH = 4


@functools.partial(jax.tree_util.register_dataclass, meta_fields=["all_greedy"], data_fields=[
    "temperatures", "top_k", "top_p", "min_p", "seeds", "output_indices", "suppressed_token_ids"])
@dataclasses.dataclass
class SamplingBatch:
    """Sampling parameters of the R sampled rows of a step; W suppressed-token slots per row.

    `all_greedy` (static: a step of greedy rows only compiles a program without random sampling) says that every
    temperature is 0; False is always correct, only slower.
    """

    temperatures: jax.Array          # float32[R], 0 is greedy
    top_k: jax.Array                 # int32[R], <= 0 is off
    top_p: jax.Array                 # float32[R]
    min_p: jax.Array                 # float32[R]
    seeds: jax.Array                 # uint32[R]
    output_indices: jax.Array        # int32[R] index of the token being sampled in the request's output
    suppressed_token_ids: jax.Array  # int32[R, W] tokens that may not be sampled; -1 pads
    all_greedy: bool = False


def pack_sampling(requests: list[Request | None], eos_token_ids: tuple[int, ...]) -> SamplingBatch:
    """Sampling parameters of each row's request; rows without one (None) are greedy padding."""
    suppressed = [() if r is None else r.suppressed_token_ids(eos_token_ids) for r in requests]
    width = power_of_two_at_least(max(map(len, suppressed), default=0), MIN_SUPPRESSED_WIDTH)
    suppressed_ids = np.full((len(requests), width), -1, np.int32)
    for row, ids in enumerate(suppressed):
        suppressed_ids[row, :len(ids)] = ids

    padding = (0.0, 0, 1.0, 0.0, 0, 0)
    rows = [padding if r is None else (r.sampling_params.temperature, r.sampling_params.top_k, r.sampling_params.top_p,
                                       r.sampling_params.min_p, r.seed, len(r.output_token_ids)) for r in requests]
    columns = zip(*rows) if rows else [()] * len(padding)
    dtypes = (np.float32, np.int32, np.float32, np.float32, np.uint32, np.int32)
    temperatures, top_k, top_p, min_p, seeds, output_indices = (np.array(column, dtype)
                                                                 for column, dtype in zip(columns, dtypes))
    return SamplingBatch(temperatures=temperatures, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                         output_indices=output_indices, suppressed_token_ids=suppressed_ids,
                         all_greedy=not temperatures.any())


def sample(logits: jax.Array, sampling: SamplingBatch) -> jax.Array:
    """Next token of every row: logits float32[R, V] -> int32[R]."""
    rows = jnp.arange(logits.shape[0])[:, None]
    suppressed = jnp.where(sampling.suppressed_token_ids < 0, logits.shape[1], sampling.suppressed_token_ids)
    logits = logits.at[rows, suppressed].set(-jnp.inf, mode="drop")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Decided when the batch is packed, not by a lax.cond: on a GPU a conditional copies its predicate to the host
    # and waits for it, in the middle of every step.
    if sampling.all_greedy:
        return greedy
    return jnp.where(sampling.temperatures == 0.0, greedy, _sample_random(logits, sampling))


def _sample_random(logits: jax.Array, sampling: SamplingBatch) -> jax.Array:
    vocab_size = logits.shape[1]
    scaled = logits / jnp.maximum(sampling.temperatures, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    top_k = jnp.where(sampling.top_k <= 0, vocab_size, jnp.minimum(sampling.top_k, vocab_size))
    in_top_k = jnp.arange(vocab_size)[None, :] < top_k[:, None]
    sorted_probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    # top-p keeps the smallest prefix of the sorted tokens whose mass reaches top_p (always the first token).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    num_kept = jnp.sum(in_top_k & (mass_before < sampling.top_p[:, None]), axis=-1)
    threshold = jnp.take_along_axis(sorted_desc, (num_kept - 1)[:, None], axis=-1)
    # min-p keeps tokens whose probability is at least min_p times the largest: a bound on the scaled logit.
    min_p_floor = sorted_desc[:, :1] + jnp.log(jnp.maximum(sampling.min_p, 1e-30))[:, None]
    keep = (scaled >= threshold) & ((sampling.min_p[:, None] == 0.0) | (scaled >= min_p_floor))
    filtered = jnp.where(keep, scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, index: jax.random.fold_in(jax.random.key(seed), index))(
        sampling.seeds, sampling.output_indices)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

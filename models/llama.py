"""Flax Llama (Llama 2, 3, 3.1): a decoder layer split into three pure functions.

Linen rather than NNX: `init` and `apply` are already pure functions of a params pytree, which is what jitted
steps that donate the KV cache, orbax and weight loading all want; NNX's mutable objects would need a
split/merge at every jit boundary.

Params ("layers" is a list of L per-layer dicts, and steps loop over it in Python):
  embed       [V, D]            final_norm [D]          lm_head [D, V] (untied checkpoints only)
  layers[l]/input_norm [D]      wqkv [D, Hkv*(G+2)*Dh]  wo [Hq*Dh, D]
  layers[l]/post_norm  [D]      w_gate, w_up [D, I]     w_down [I, D]
wqkv holds the q, k and v projections side by side, grouped by kv head: for each kv head, the columns of its
G = Hq/Hkv q heads, then its k, then its v (`fuse_qkv`), so that a column split over tensor-parallel shards gives
each shard whole groups. Kept separate, XLA:GPU merges the three matmuls by concatenating their weights at run
time, 48 MB per layer for Llama-3-8B: 25 us per layer, 4% of a batch-256 decode step on the H200.
Not stacked [L, ...] leaves under a `lax.scan`: on the H100 XLA copies each layer's slice of stacked weights
out before its matmuls, which doubled the weight traffic of a Llama-3-8B decode step (16.3 ms vs 7.2 ms at
batch 1, 17.6 vs 9.0 ms at batch 256; benchmarks/results/layer_loop_h100.md).
The layer functions take tokens flattened across requests: hidden [T, D], positions int32 [T].
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.models.config import ModelConfig, RopeScaling

Params = dict[str, Any]


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed.astype(x.dtype) * scale).astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """Per-pair rotation frequencies [Dh/2], with llama3 scaling applied when configured."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scaled(inv_freq: jax.Array, scaling: RopeScaling) -> jax.Array:
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return jnp.where(is_medium, blended, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, config: ModelConfig) -> jax.Array:
    """Rotates x [T, H, Dh] by positions [T], HF's half-split convention, in fp32.

    The halves are swapped by reversing an axis of 2 rather than split and concatenated, and the sign goes into
    the small sin table (as HF's rotate_half does): x [first | second] -> [first cos - second sin | second cos +
    first sin] is then one elementwise pass (split + concatenate left an unfused concatenate kernel per layer
    in the H200 profile of a decode step)."""
    angles = positions.astype(jnp.float32)[:, None] * rope_inverse_frequencies(config)[None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos = jnp.stack([cos, cos], axis=1)[:, None, :, :]   # [T, 1, 2, Dh/2]
    sin = jnp.stack([-sin, sin], axis=1)[:, None, :, :]
    halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, -1)  # [T, H, 2, Dh/2]
    rotated = halves * cos + jnp.flip(halves, axis=-2) * sin
    return rotated.reshape(x.shape).astype(x.dtype)


class DecoderLayer(nn.Module):
    """One Llama layer; its two halves are exposed as methods and wrapped as pure functions below."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        dense_init = nn.initializers.normal(0.02)
        self.input_norm = self.param("input_norm", nn.initializers.ones, (c.hidden_size,), dtype)
        self.wqkv = self.param("wqkv", dense_init, (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
                               dtype)
        self.wo = self.param("wo", dense_init, (c.num_heads * c.head_dim, c.hidden_size), dtype)
        self.post_norm = self.param("post_norm", nn.initializers.ones, (c.hidden_size,), dtype)
        self.w_gate = self.param("w_gate", dense_init, (c.hidden_size, c.intermediate_size), dtype)
        self.w_up = self.param("w_up", dense_init, (c.hidden_size, c.intermediate_size), dtype)
        self.w_down = self.param("w_down", dense_init, (c.intermediate_size, c.hidden_size), dtype)

    def pre_attention(self, hidden: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        x = rms_norm(hidden, self.input_norm, c.rms_norm_eps)
        num_tokens, group = hidden.shape[0], c.num_heads // c.num_kv_heads
        qkv = _dense(x, self.wqkv).reshape(num_tokens, c.num_kv_heads, group + 2, c.head_dim)
        q = qkv[:, :, :group].reshape(num_tokens, c.num_heads, c.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        return apply_rope(q, positions, c), apply_rope(k, positions, c), v

    def post_attention(self, hidden: jax.Array, attn_out: jax.Array) -> jax.Array:
        c = self.config
        hidden = hidden + _dense(attn_out.reshape(hidden.shape[0], -1).astype(hidden.dtype), self.wo)
        x = rms_norm(hidden, self.post_norm, c.rms_norm_eps)
        gate = _dense(x, self.w_gate)
        mlp = _dense(jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * _dense(x, self.w_up), self.w_down)
        return hidden + mlp

    def __call__(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
        q, k, v = self.pre_attention(hidden, positions)
        return self.post_attention(hidden, causal_attention(q[None], k[None], v[None])[0])


def _check_flat_tokens(name: str, array: jax.Array, rank: int) -> None:
    if array.ndim != rank:
        raise ValueError(f"{name}: expected {rank} dims with tokens flattened across requests, got shape {array.shape}")


def pre_attention(layer_params: Params, config: ModelConfig, hidden: jax.Array,
                  positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Input norm, QKV projection, RoPE: hidden [T, D], positions int32 [T] -> q [T, Hq, Dh], k, v [T, Hkv, Dh].

    Tokens must be flattened across requests; extra leading batch dims are rejected.
    """
    _check_flat_tokens("hidden", hidden, 2)
    _check_flat_tokens("positions", positions, 1)
    return DecoderLayer(config).apply({"params": layer_params}, hidden, positions,
                                      method=DecoderLayer.pre_attention)


def post_attention(layer_params: Params, config: ModelConfig, hidden: jax.Array,
                   attn_out: jax.Array) -> jax.Array:
    """Output projection, residual, norm, SiLU MLP, residual -> [T, D].

    hidden [T, D] is the layer's input (the residual), attn_out [T, Hq, Dh]; tokens flattened as in pre_attention.
    """
    _check_flat_tokens("hidden", hidden, 2)
    _check_flat_tokens("attn_out", attn_out, 3)
    return DecoderLayer(config).apply({"params": layer_params}, hidden, attn_out,
                                      method=DecoderLayer.post_attention)


def fuse_qkv(config: ModelConfig, wq: np.ndarray, wk: np.ndarray, wv: np.ndarray) -> np.ndarray:
    """wq [D, Hq*Dh], wk and wv [D, Hkv*Dh] (host arrays) -> wqkv [D, Hkv*(G+2)*Dh], grouped by kv head."""
    grouped = [w.reshape(w.shape[0], config.num_kv_heads, -1, config.head_dim) for w in (wq, wk, wv)]
    return np.concatenate(grouped, axis=2).reshape(wq.shape[0], -1)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Reference softmax attention, fp32: q [B, S, Hq, Dh], k/v [B, S, Hkv, Dh] -> [B, S, Hq, Dh]."""
    batch, seq, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    qg = q.reshape(batch, seq, k.shape[2], group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) / math.sqrt(head_dim)
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq, num_heads, head_dim).astype(q.dtype)


def embed_tokens(params: Params, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Token ids int32 [T] -> hidden [T, D] in the params' dtype."""
    return jnp.take(params["embed"], token_ids, axis=0)


def final_logits(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Final norm and LM head: hidden [T, D] -> float32 logits [T, V]."""
    x = rms_norm(hidden, params["final_norm"], config.rms_norm_eps)
    head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("td,dv->tv", x, head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=1)
def forward(params: Params, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Full causal forward over token_ids [B, S] at positions 0..S-1 -> float32 logits [B, S, V]."""
    batch, seq = token_ids.shape
    hidden = embed_tokens(params, config, token_ids.reshape(-1))
    positions = jnp.tile(jnp.arange(seq, dtype=jnp.int32), batch)

    split = lambda x: x.reshape(batch, seq, *x.shape[1:])
    for layer_params in params["layers"]:
        q, k, v = pre_attention(layer_params, config, hidden, positions)
        attn = causal_attention(split(q), split(k), split(v)).reshape(q.shape)
        hidden = post_attention(layer_params, config, hidden, attn)
    return final_logits(params, config, hidden).reshape(batch, seq, -1)


def _rbg_key(key: jax.Array) -> jax.Array:
    """A key of XLA's RngBitGenerator seeded from `key`: threefry needs several times the drawn tensors' size in
    temporaries (67 GB for all of Llama-3-8B), this a few hundred MB. Its values differ between backends."""
    return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def init_layer_params(config: ModelConfig, key: jax.Array) -> Params:
    """One decoder layer's random params (jit it: `init_params` runs the one program for every layer)."""
    dtype = jnp.dtype(config.dtype)
    dummy_hidden = jnp.zeros((1, config.hidden_size), dtype)
    return DecoderLayer(config).init(_rbg_key(key), dummy_hidden, jnp.zeros((1,), jnp.int32))["params"]


def init_embedding_params(config: ModelConfig, key: jax.Array) -> Params:
    """The random params outside the decoder layers: embeddings, final norm, LM head when untied."""
    dtype = jnp.dtype(config.dtype)
    embed_key, head_key = jax.random.split(_rbg_key(key))
    params: Params = {
        "embed": 0.02 * jax.random.normal(embed_key, (config.vocab_size, config.hidden_size), dtype),
        "final_norm": jnp.ones((config.hidden_size,), dtype),
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = 0.02 * jax.random.normal(head_key, (config.hidden_size, config.vocab_size), dtype)
    return params


def init_params(config: ModelConfig, key: jax.Array, shardings: Params | None = None) -> Params:
    """Random params made straight on the device by two small programs: the decoder layer's compiles once and
    runs for every layer (seconds for an 8B model; one program unrolled over all layers took minutes of XLA
    compilation on the GPU). `shardings`: NamedShardings shaped like the params, so that each device makes and
    keeps only its shards. The values differ between backends for the same key.
    """
    embedding_key, layers_key = jax.random.split(key)
    layer_options, embedding_options = {}, {}
    if shardings is not None:
        layer_options["out_shardings"] = shardings["layers"][0]
        embedding_options["out_shardings"] = {name: value for name, value in shardings.items() if name != "layers"}
    init_layer = jax.jit(init_layer_params, static_argnums=0, **layer_options)
    params = jax.jit(init_embedding_params, static_argnums=0, **embedding_options)(config, embedding_key)
    params["layers"] = [init_layer(config, layer_key) for layer_key in jax.random.split(layers_key, config.num_layers)]
    return params

// The XLA FFI handler of the CUDA paged decode attention (platform "CUDA"): operands q, k_cache, v_cache,
// block_tables, context_lens; results out and the split-K workspace partial_out, partial_lse (f32, at least
// batch * num_heads * num_splits * head_dim and batch * num_heads * num_splits elements when num_splits > 1);
// attributes scale (f32), partition_blocks (i32, KV blocks per split) and group_tile (i32, query heads per CTA).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(kPagedDecodeAttention);

// The XLA FFI handler of the CUDA paged decode attention (platform "CUDA"): operands q, k_cache, v_cache,
// block_tables, context_lens; attributes scale (f32) and partition_blocks (i32, 0 = chosen per call).
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(kPagedDecodeAttention);

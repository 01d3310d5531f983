// What each handoff call computes on host memory, shared by the CPU-platform FFI handlers (which
// pass XLA's own buffers) and the CUDA dispatcher (which passes the pinned staging copies):
//   attention: append k_new / v_new at slot_mapping into the pool's layer, then paged decode
//              attention of q over that layer (context_lens include the new token);
//   store:     write k_rows / v_rows at slot_mapping into the pool's layer;
//   load:      read the rows at slot_mapping out of the pool's layer.
// A store's or load's layer is one for every row, or one per row (all of a swap's layers in one call).
// Padding: slot -1 is skipped (load gives a zero row), context length 0 gives a zero output row.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "host_pool.h"
#include "xla/ffi/api/ffi.h"

namespace neo {

namespace ffi = xla::ffi;

struct AttentionShape {
  int64_t num_reqs = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_blocks_per_req = 0;
  DType q_dtype = DType::kFloat32;  // of q and the output
  DType kv_dtype = DType::kFloat32;
  size_t q_bytes() const { return num_reqs * num_q_heads * head_dim * dtype_bytes(q_dtype); }
  size_t kv_bytes() const { return num_reqs * num_kv_heads * head_dim * dtype_bytes(kv_dtype); }
  size_t rows_bytes() const { return q_bytes() + 2 * kv_bytes(); }
  int64_t requests_size() const { return num_reqs * (2 + max_blocks_per_req); }
};

struct AttentionOperands {
  const void* q = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  const int32_t* layer = nullptr;
  const int32_t* slot_mapping = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* context_lens = nullptr;
  void* out = nullptr;
};

struct KvRowsOperands {
  int64_t num_rows = 0;
  const int32_t* layer = nullptr;  // [] or [num_rows] (layer_per_row)
  const int32_t* slot_mapping = nullptr;
  void* k_rows = nullptr;  // read by store, written by load
  void* v_rows = nullptr;
  bool layer_per_row = false;
};

// The registered pool of a call, or nullptr with *error naming op and pool_id.
std::shared_ptr<HostKvPool> pool_for_call(const char* op, int64_t pool_id, std::string* error);

// Shapes and dtypes of the FFI operands against the pool ("" when fine, else an error naming the
// operand); contents are checked by the run_* functions.
std::string check_attention_operands(const HostKvPool& pool, ffi::AnyBuffer rows, ffi::AnyBuffer layer,
                                     ffi::AnyBuffer requests, int64_t num_reqs, int64_t num_q_heads,
                                     std::string_view q_dtype, AttentionShape* shape);
// The operands inside the packed rows and requests (see handoff.h), the output at out.
AttentionOperands unpack_attention_operands(const AttentionShape& shape, const char* rows, const int32_t* layer,
                                            const int32_t* requests, void* out);
std::string check_kv_rows_operands(const char* op, const HostKvPool& pool, ffi::AnyBuffer k_rows,
                                   ffi::AnyBuffer v_rows, ffi::AnyBuffer layer,
                                   ffi::AnyBuffer slot_mapping);

// Each returns "" or an error naming the bad operand; on error nothing is written to the pool and
// the outputs are zeroed.
std::string run_attention(const HostKvPool& pool, const AttentionShape& shape,
                          const AttentionOperands& operands);
std::string run_store(const HostKvPool& pool, const KvRowsOperands& operands);
std::string run_load(const HostKvPool& pool, const KvRowsOperands& operands);

}  // namespace neo

"""Engine sizes most tests of neo_jax share, so that the step programs one test compiles serve the next ones
(a module of its own: test files importing `conftest` by name got another directory's conftest whenever pytest
collected that one first)."""

# 8 requests, 64 tokens per step, 128-token requests, blocks of 8.
ENGINE_OPTIONS = dict(max_model_len=128, block_size=8, num_gpu_blocks=96, max_num_seqs=8, max_num_batched_tokens=64)

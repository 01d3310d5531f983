"""One request's state as it moves through waiting -> running -> finished."""

from __future__ import annotations

import dataclasses
import enum

from neo_jax.sampling_params import SamplingParams


def pending_token(row: int) -> int:
    """The placeholder of a token that a step still on the device samples in row `row` of its sampled rows
    (asynchronous scheduling): negative, so that no token id equals it. The next step's program reads the token
    there from the device (neo_jax.batch.resolve_pending_tokens); the engine replaces it once it fetches it."""
    return -1 - row


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """The token ids of a prompt and of its output so far, and how many of them the KV cache holds.

    Token i's KV lives in block `block_table[i // block_size]` of the pool named `kv_pool` (None while it holds
    nothing). After a preemption the blocks are freed and `num_computed_tokens` drops to 0: the prompt and the
    output so far are prefilled again (recomputation), and since each token's random key depends only on
    (seed, output index), the continuation is the one the request would have produced without preemption.
    Under asynchronous scheduling the last output token is a `pending_token` while the step sampling it runs.
    """

    request_id: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    kv_pool: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_ready_output_tokens(self) -> int:
        """Output tokens fetched from the device: all but a `pending_token` at the end."""
        num_output = len(self.output_token_ids)
        return num_output - 1 if num_output and self.output_token_ids[-1] < 0 else num_output

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def stop_reason(self, eos_token_ids: tuple[int, ...], max_model_len: int) -> str | None:
        """Why the request is finished after its newest token, or None if it goes on."""
        params = self.sampling_params
        num_output = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if num_output >= params.min_tokens and (
                last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids)):
            return "stop"
        if num_output >= params.max_tokens or self.num_tokens >= max_model_len:
            return "length"
        return None

    def suppressed_token_ids(self, eos_token_ids: tuple[int, ...]) -> tuple[int, ...]:
        """Tokens that may not be sampled next: the stop tokens while fewer than min_tokens were produced."""
        params = self.sampling_params
        if len(self.output_token_ids) >= params.min_tokens:
            return ()
        eos = () if params.ignore_eos else eos_token_ids
        return tuple(dict.fromkeys(params.stop_token_ids + eos))

"""What `LLM.generate` returns: vLLM-shaped `RequestOutput` / `CompletionOutput`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One sampled completion; finish_reason is "stop" (a stop or EOS token), "length" or "error"."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclasses.dataclass
class RequestOutput:
    """The result of one prompt; `error` says why a request that failed validation never ran."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    error: str | None = None

"""How one request is sampled and when it stops: vLLM's `SamplingParams`, validated on construction."""

from __future__ import annotations

import dataclasses

_INTEGER_FIELDS = ("n", "top_k", "max_tokens", "min_tokens")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping rules.

    temperature 0 is greedy. top_k 0 (or -1), top_p 1 and min_p 0 switch those filters off. A token's random key
    is derived from (seed, index of the output token), so a seeded request samples the same tokens whatever else
    shares its batches; seed None takes a seed from the engine's seeded generator. n completions are sampled per
    prompt; completion i uses a seed derived from (seed, i).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        rules = {
            "n": (self.n >= 1, "an integer >= 1"),
            "temperature": (self.temperature >= 0.0, ">= 0 (0 is greedy)"),
            "top_k": (self.top_k >= -1, "0 or -1 (off) or a positive count"),
            "top_p": (0.0 < self.top_p <= 1.0, "in (0, 1]"),
            "min_p": (0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            "seed": (self.seed is None or 0 <= self.seed < 2**32, "None or in [0, 2**32)"),
            "max_tokens": (self.max_tokens >= 1, "an integer >= 1"),
            "min_tokens": (0 <= self.min_tokens <= self.max_tokens, f"in [0, max_tokens={self.max_tokens}]"),
            "stop_token_ids": (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                               "non-negative integers"),
        }
        for field, (ok, rule) in rules.items():
            value = getattr(self, field)
            if field in _INTEGER_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
                ok = False
            if not ok:
                raise ValueError(f"{field}: {value!r} is invalid; must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

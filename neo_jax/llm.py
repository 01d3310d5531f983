"""The offline API, vLLM-like: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from neo_jax.config import EngineConfig
from neo_jax.engine import LLMEngine
from neo_jax.outputs import CompletionOutput, RequestOutput
from neo_jax.sampling_params import SamplingParams
from neo_jax.sequence import Request

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int] | np.ndarray


def completion_seed(seed: int, completion_index: int) -> int:
    """The seed of completion i of a request seeded with `seed`."""
    return int(np.random.SeedSequence([seed, completion_index]).generate_state(1)[0])


class LLM:
    """A model served by the engine. `model` is an HF checkpoint directory or a preset name ("tiny", ...).

    Other keyword options are `EngineConfig` fields (block_size, num_gpu_blocks, gpu_memory_utilization,
    max_num_batched_tokens, max_num_seqs, tensor_parallel_size).
    """

    def __init__(self, model: str = "tiny", *, dtype: str | None = None, max_model_len: int | None = None,
                 gpu_kv_cache_gb: float | None = None, policy: str = "gpu-only", seed: int = 0,
                 **engine_options: object) -> None:
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        for name in engine_options:
            if name not in fields:
                raise ValueError(f"{name}: not an engine option; choose from {sorted(fields)}")
        config = EngineConfig(model=str(model), dtype=dtype, max_model_len=max_model_len,
                              gpu_kv_cache_gb=gpu_kv_cache_gb, policy=policy, seed=seed, **engine_options)
        self.engine = LLMEngine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completions of every prompt, in prompt order. A prompt is a string or token ids (a list, or a 1-D
        integer array; a 2-D array is a batch of prompts).

        A prompt that cannot be served (empty, longer than max_model_len, ids outside the vocabulary, neither text
        nor token ids) gets a RequestOutput with finish_reason "error" and `.error` set; the other prompts still run.
        Every prompt is checked before any is queued, so a call that raises leaves the engine as it found it.
        """
        prompt_list = _prompt_list(prompts)
        params_list = self._params_per_prompt(sampling_params, len(prompt_list))
        prepared = [self._prepare(prompt) for prompt in prompt_list]
        results: list[RequestOutput | None] = [None] * len(prompt_list)
        completions: dict[int, list[Request]] = {}
        for index, ((text, token_ids, error), params) in enumerate(zip(prepared, params_list)):
            if error is not None:
                logger.warning("prompt %d fails: %s", index, error)
                results[index] = RequestOutput(self.engine.new_request_id(), text, token_ids,
                                               [CompletionOutput(0, "", [], "error")], error=error)
                continue
            seeds = [None if params.seed is None else completion_seed(params.seed, i) for i in range(params.n)]
            completions[index] = [self.engine.add_request(token_ids, params, seed) for seed in seeds]
            results[index] = RequestOutput(completions[index][0].request_id, text,
                                           completions[index][0].prompt_token_ids, [])
        self._run(completions, use_tqdm)
        for index, requests in completions.items():
            results[index].outputs = [
                CompletionOutput(i, self._detokenize(r.output_token_ids), list(r.output_token_ids), r.finish_reason)
                for i, r in enumerate(requests)]
        return results

    def _run(self, completions: dict[int, list[Request]], use_tqdm: bool) -> None:
        prompt_of = {r.request_id: index for index, requests in completions.items() for r in requests}
        remaining = {index: len(requests) for index, requests in completions.items()}
        with tqdm(total=len(completions), disable=not use_tqdm, desc="generate", unit="prompt") as bar:
            while self.engine.has_unfinished_requests():
                for request in self.engine.step():
                    index = prompt_of.get(request.request_id)
                    if index is None:  # queued through llm.engine by the caller, who holds its Request
                        continue
                    remaining[index] -= 1
                    if remaining[index] == 0:
                        bar.update(1)

    @staticmethod
    def _params_per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                           num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params_list = list(sampling_params)
        if len(params_list) != num_prompts:
            raise ValueError(f"sampling_params: {len(params_list)} given for {num_prompts} prompts")
        for params in params_list:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params: {params!r} is not a SamplingParams")
        return params_list

    def _prepare(self, prompt: object) -> tuple[str | None, list[int], str | None]:
        """(text, token ids, why it cannot be served or None). Raises ValueError for text without a tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts: {self.engine.config.model} has no tokenizer.json; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
            return prompt, token_ids, self.engine.prompt_error(token_ids)
        if _is_array(prompt):
            prompt = np.asarray(prompt)
            if prompt.ndim != 1:
                return None, [], f"prompts: a token-id array must be 1-D, not of shape {prompt.shape}"
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence):
            return None, [], f"prompts: {prompt!r} is neither a string nor a sequence of token ids"
        token_ids = list(prompt)
        return None, token_ids, self.engine.prompt_error(token_ids)

    def _detokenize(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)


def _prompt_list(prompts: object) -> list[object]:
    """The prompts of a generate call: one string or token-id sequence, or many; arrays by their rows."""
    if _is_array(prompts):
        rows = np.asarray(prompts)
        return [rows] if rows.ndim <= 1 else list(rows)
    if isinstance(prompts, str) or _is_token_ids(prompts):
        return [prompts]
    if not isinstance(prompts, Iterable):
        raise ValueError(f"prompts: {prompts!r} is neither a prompt nor a sequence of prompts")
    return list(prompts)


def _is_array(value: object) -> bool:
    """A NumPy or JAX array (anything np.asarray takes whole), not a list."""
    return hasattr(value, "__array__") and not isinstance(value, Sequence)


def _is_token_ids(prompts: object) -> bool:
    return (isinstance(prompts, Sequence) and len(prompts) > 0
            and all(isinstance(t, (int, np.integer)) for t in prompts))

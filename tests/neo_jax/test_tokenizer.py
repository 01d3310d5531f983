"""Text in and out: the byte-level fallback of presets and a checkpoint's tokenizer.json."""

from __future__ import annotations

import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tiny_engine import ENGINE_OPTIONS
from neo_jax import LLM, SamplingParams
from neo_jax.tokenizer import BYTE_OFFSET, ByteTokenizer, HFTokenizer

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world", "paged", "attention"]


def test_byte_tokenizer_round_trip_and_drops_ids_outside_the_byte_range():
    tokenizer = ByteTokenizer(vocab_size=512, bos_token_id=1)
    ids = tokenizer.encode("héllo")
    assert ids[0] == 1 and ids[1:] == [BYTE_OFFSET + b for b in "héllo".encode()]
    assert tokenizer.decode(ids + [2, 400]) == "héllo"
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(vocab_size=100, bos_token_id=1)


def test_preset_string_prompts_use_the_byte_tokenizer():
    llm = LLM("tiny", **ENGINE_OPTIONS)
    output = llm.generate("hi", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert output.prompt == "hi" and output.prompt_token_ids == [1, BYTE_OFFSET + ord("h"), BYTE_OFFSET + ord("i")]
    assert output.outputs[0].text == llm.tokenizer.decode(output.outputs[0].token_ids)


def test_checkpoint_tokenizer_json_is_used(hf_llama, tmp_path):
    for file in hf_llama[0].iterdir():
        shutil.copy(file, tmp_path)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "tokenizer.json"))
    llm = LLM(str(tmp_path), **ENGINE_OPTIONS)
    assert isinstance(llm.tokenizer, HFTokenizer)
    output = llm.generate(["hello paged attention"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)[0]
    assert output.prompt_token_ids == [3, 5, 6]
    assert output.outputs[0].text == word_level.decode(output.outputs[0].token_ids, skip_special_tokens=True)

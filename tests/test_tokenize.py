"""Tokenization and truncation in NxDT's order, against hand-computed token ids.

The tokenizer is a hand-written BPE (no pre-tokenizer, so merges may cross the prompt/answer
boundary): single characters a b c d q v w x y z, merges "a b" -> "ab" and "ab c" -> "abc".
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from recipe_runner.data.tokenize import assemble_pair, split_joint, tokenize_pair, pad_token_id
from recipe_runner.errors import UserError

CHARS = "abcdqvwxyz"


def bpe_tokenizer(bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    vocab["ab"] = len(vocab)
    vocab["abc"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>" if eos else None, pad_token="<pad>"
    )


TOK = bpe_tokenizer()
BOS, EOS = 0, 1
T = {name: TOK.convert_tokens_to_ids(name) for name in list(CHARS) + ["ab", "abc"]}


def ids(*names: str) -> list[int]:
    return [T[n] for n in names]


def labels(prompt_len: int, answer: list[int]) -> list[int]:
    return [-100] * prompt_len + answer


def test_tokenizer_is_what_the_test_assumes():
    assert TOK("xabcd", add_special_tokens=False)["input_ids"] == ids("x", "abc", "d")
    assert TOK("xab", add_special_tokens=False)["input_ids"] == ids("x", "ab")


def test_no_truncation_when_it_fits_exactly():
    # prompt BOS w x y v (5), chosen z z EOS (3), rejected q EOS (2): 5 + 3 == 8
    out = tokenize_pair(TOK, "wxyv", "zz", "q", seq_length=8, max_prompt_length=4)
    assert out["chosen_input_ids"] == [BOS] + ids("w", "x", "y", "v", "z", "z") + [EOS]
    assert out["chosen_labels"] == labels(5, ids("z", "z") + [EOS])
    assert out["rejected_input_ids"] == [BOS] + ids("w", "x", "y", "v", "q") + [EOS]
    assert out["rejected_labels"] == labels(5, ids("q") + [EOS])
    assert out["prompt_length"] == 5
    assert not out["prompt_truncated"] and not out["response_truncated"]


@pytest.mark.parametrize("mode, prompt", [
    ("keep_start", [BOS] + ids("w", "x", "y")),
    ("keep_end", ids("w", "x", "y", "v")),  # trl 0.10.1 slices the prompt with its BOS
])
def test_prompt_one_over_max_prompt_length_is_cut(mode, prompt):
    # 5 + 3 = 8 > 7: prompt 5 is one over max_prompt_length 4; after the cut 4 + 3 == 7 fits,
    # so the answers (3 == seq_length - max_prompt_length, exactly) stay whole.
    out = tokenize_pair(TOK, "wxyv", "zz", "q", seq_length=7, max_prompt_length=4, truncation_mode=mode)
    assert out["chosen_input_ids"] == prompt + ids("z", "z") + [EOS]
    assert out["rejected_input_ids"] == prompt + ids("q") + [EOS]
    assert out["chosen_labels"] == labels(4, ids("z", "z") + [EOS])
    assert out["prompt_length"] == 4
    assert out["prompt_truncated"] and not out["response_truncated"]


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_prompt_exactly_max_prompt_length_is_kept_and_answers_cut(mode):
    # prompt 5 == max_prompt_length: no prompt cut; 5 + 3 > 7 so answers are cut to 7 - 5 = 2:
    # chosen (3, one over) loses its EOS, rejected (2, exactly) is unchanged.
    out = tokenize_pair(TOK, "wxyv", "zz", "q", seq_length=7, max_prompt_length=5, truncation_mode=mode)
    prompt = [BOS] + ids("w", "x", "y", "v")
    assert out["chosen_input_ids"] == prompt + ids("z", "z")
    assert out["chosen_labels"] == labels(5, ids("z", "z"))
    assert out["rejected_input_ids"] == prompt + ids("q") + [EOS]
    assert not out["prompt_truncated"] and out["response_truncated"]


@pytest.mark.parametrize("mode, prompt", [
    ("keep_start", [BOS] + ids("w", "x", "y")),
    ("keep_end", ids("w", "x", "y", "v")),
])
def test_prompt_and_answers_both_cut(mode, prompt):
    # seq 6, max prompt 4: prompt cut to 4, 4 + 3 > 6, answers cut to 2
    out = tokenize_pair(TOK, "wxyv", "zz", "q", seq_length=6, max_prompt_length=4, truncation_mode=mode)
    assert out["chosen_input_ids"] == prompt + ids("z", "z")
    assert out["rejected_input_ids"] == prompt + ids("q") + [EOS]
    assert len(out["chosen_input_ids"]) == 6
    assert out["prompt_truncated"] and out["response_truncated"]


def test_long_answers_are_cut_even_when_the_prompt_is_short():
    # trl 0.10.1: answers are cut to seq_length - max_prompt_length whenever the pair is too long
    out = tokenize_pair(TOK, "w", "zzzzzz", "q", seq_length=6, max_prompt_length=3)
    assert out["chosen_input_ids"] == [BOS] + ids("w", "z", "z", "z")
    assert out["rejected_input_ids"] == [BOS] + ids("w", "q") + [EOS]


def test_merge_across_boundary_keeps_the_merged_token():
    # chosen: "xab"+"cd" -> x abc d: "abc" straddles the boundary and becomes the answer's first
    # token (trl 0.10.1 would lose it); rejected: "xab"+"d" -> x ab d, no merge.
    out = tokenize_pair(TOK, "xab", "cd", "d", seq_length=32, max_prompt_length=16)
    assert out["chosen_input_ids"] == [BOS] + ids("x", "abc", "d") + [EOS]
    assert out["chosen_labels"] == labels(2, ids("abc", "d") + [EOS])
    assert out["prompt_length"] == 2
    assert out["rejected_input_ids"] == [BOS] + ids("x", "ab", "d") + [EOS]
    assert out["rejected_labels"] == labels(3, ids("d") + [EOS])
    assert out["rejected_prompt_length"] == 3
    assert "".join(TOK.convert_ids_to_tokens(out["chosen_input_ids"][1:-1])) == "xabcd"


def test_split_joint_is_lossless():
    prompt, answer = split_joint(ids("x", "ab"), ids("x", "abc", "d"))
    assert (prompt, answer) == (ids("x"), ids("abc", "d"))
    assert split_joint(ids("x", "ab"), ids("x", "ab", "d")) == (ids("x", "ab"), ids("d"))


def test_bos_and_eos_are_never_doubled():
    out = tokenize_pair(TOK, "<s>xy", "z</s>", "q", seq_length=32, max_prompt_length=16)
    assert out["chosen_input_ids"] == [BOS] + ids("x", "y", "z") + [EOS]
    assert out["rejected_input_ids"] == [BOS] + ids("x", "y", "q") + [EOS]
    assert out["chosen_input_ids"].count(BOS) == 1 and out["chosen_input_ids"].count(EOS) == 1


def test_tokenizer_without_bos_or_eos_adds_none():
    tok = bpe_tokenizer(bos=False, eos=False)
    out = tokenize_pair(tok, "xy", "z", "q", seq_length=32, max_prompt_length=16)
    assert out["chosen_input_ids"] == ids("x", "y", "z")
    assert out["chosen_labels"] == labels(2, ids("z"))


def test_pair_with_an_empty_answer_is_none():
    # the answer text produced no tokens of its own and there is no EOS to add
    assert assemble_pair([5, 6], [5, 6], [5, 6, 7], bos_id=None, eos_id=None, seq_length=8, max_prompt_length=4) is None
    assert assemble_pair([5, 6], [5, 6, 8], [5, 6, 7], bos_id=None, eos_id=None, seq_length=8, max_prompt_length=4)


@pytest.mark.parametrize("kwargs", [
    {"seq_length": 8, "max_prompt_length": 8},
    {"seq_length": 8, "max_prompt_length": 0},
    {"seq_length": 8, "max_prompt_length": 4, "truncation_mode": "middle"},
])
def test_bad_settings_are_user_errors(kwargs):
    with pytest.raises(UserError):
        tokenize_pair(TOK, "xy", "z", "q", **kwargs)


def test_pad_token_id_falls_back_to_eos_then_zero():
    assert pad_token_id(TOK) == 2
    tok = bpe_tokenizer()
    tok.pad_token = None
    assert pad_token_id(tok) == EOS

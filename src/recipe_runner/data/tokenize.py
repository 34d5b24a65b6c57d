"""Tokenize and truncate preference pairs: the ONE place where truncation happens.

The order is NxDT's (trl 0.10.1 `_tokenize`), so a recipe moved here from NxDT trains on the
same tokens, with one deliberate difference (see `split_joint`):

1. For chosen and rejected separately, tokenize the prompt alone and prompt+answer, both without
   special tokens. If BPE merged characters across the prompt/answer boundary, the joint
   tokenization's first k tokens differ from the prompt's k tokens; then the prompt part is the
   first k-1 joint tokens and the answer starts at joint token k-1. So prompt part + answer is
   always exactly the joint tokenization (trl 0.10.1 drops that boundary token; we keep it).
2. Prepend BOS to each prompt part unless it already starts with BOS; append EOS to each answer
   unless it already ends with EOS. A tokenizer without BOS (or EOS) gets none.
3. If len(prompt) + max(len(chosen), len(rejected)) > seq_length, cut the prompt to
   max_prompt_length: keep_start keeps its first tokens, keep_end its last. As in trl 0.10.1 the
   cut applies to the whole prompt part including BOS, so keep_end drops BOS when it cuts.
   (Kept for token-for-token compatibility with NxDT runs; keep_start always keeps BOS.)
4. If still too long, cut both answers to seq_length - max_prompt_length (EOS may be lost).
5. input = prompt + answer; labels = input with the prompt positions set to -100.

A pair whose answer is left with no tokens is returned as None; the caller drops and counts it.
"""

from __future__ import annotations

from typing import Sequence

from recipe_runner.errors import UserError

IGNORE_INDEX = -100
TRUNCATION_MODES = ("keep_start", "keep_end")


def check_settings(seq_length: int, max_prompt_length: int, truncation_mode: str) -> None:
    """Reject settings that would silently produce empty or unbounded sequences."""
    if truncation_mode not in TRUNCATION_MODES:
        raise UserError(
            f"truncation_mode is {truncation_mode!r}; it must be one of {', '.join(TRUNCATION_MODES)} "
            "(model_alignment_strategy.<dpo|orpo>.truncation_mode)."
        )
    if not 0 < max_prompt_length < seq_length:
        raise UserError(
            f"max_prompt_length ({max_prompt_length}) must be at least 1 and smaller than "
            f"data.seq_length ({seq_length}), so that every answer keeps at least one token. "
            "Set model_alignment_strategy.<dpo|orpo>.max_prompt_length below data.seq_length."
        )


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (batched: fast tokenizers run in parallel)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
    # Straight to the Rust tokenizer: half the time of tokenizer(...) on 10^5 rows, which spends
    # it building Python BatchEncodings. Set what tokenizer(...) would: no truncation/padding,
    # special tokens in the text recognised unless the tokenizer says split_special_tokens.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    if hasattr(backend, "encode_special_tokens"):
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


def split_joint(prompt_ids: Sequence[int], joint_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split the joint tokenization of prompt+answer into (prompt part, answer part).

    Why k-1: when BPE merges the prompt's last characters with the answer's first ones, the
    merged token straddles the boundary; we count it as the answer's first token so the model
    still learns to produce it (trl 0.10.1 drops it, leaving a sequence the tokenizer would never
    produce). prompt part + answer part == joint_ids, always.
    """
    k = len(prompt_ids)
    if list(joint_ids[:k]) != list(prompt_ids):
        k = max(k - 1, 0)
    return list(joint_ids[:k]), list(joint_ids[k:])


def _with_bos(ids: list[int], bos: int | None) -> list[int]:
    if bos is None or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def assemble_pair(
    prompt_ids: Sequence[int],
    chosen_joint: Sequence[int],
    rejected_joint: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int | None,
    seq_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
) -> dict | None:
    """Steps 1-5 of the module docstring on already tokenized text (pure; no tokenizer needed)."""
    prompts, answers = [], []
    for joint in (chosen_joint, rejected_joint):
        prompt_part, answer = split_joint(prompt_ids, joint)
        prompts.append(_with_bos(prompt_part, bos_id))
        answers.append(_with_eos(answer, eos_id))

    longer = max(len(a) for a in answers)
    prompt_truncated = response_truncated = False
    for i, prompt in enumerate(prompts):
        if len(prompt) + longer > seq_length:
            cut = prompt[:max_prompt_length] if truncation_mode == "keep_start" else prompt[-max_prompt_length:]
            prompt_truncated |= len(cut) < len(prompt)
            prompts[i] = cut
    for i, answer in enumerate(answers):
        if len(prompts[i]) + longer > seq_length:
            cut = answer[: seq_length - max_prompt_length]
            response_truncated |= len(cut) < len(answer)
            answers[i] = cut

    if not answers[0] or not answers[1]:
        return None
    out: dict = {}
    for name, prompt, answer in zip(("chosen", "rejected"), prompts, answers):
        out[f"{name}_input_ids"] = prompt + answer
        out[f"{name}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    out["prompt_length"] = len(prompts[0])
    out["rejected_prompt_length"] = len(prompts[1])
    out["prompt_truncated"] = prompt_truncated
    out["response_truncated"] = response_truncated
    return out


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    seq_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
) -> list[dict | None]:
    """`tokenize_pair` for many rows at once; the tokenizer sees whole batches (fast for 10^5 rows)."""
    check_settings(seq_length, max_prompt_length, truncation_mode)
    prompt_ids = encode_texts(tokenizer, prompts)
    chosen_ids = encode_texts(tokenizer, [p + c for p, c in zip(prompts, chosen)])
    rejected_ids = encode_texts(tokenizer, [p + r for p, r in zip(prompts, rejected)])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [
        assemble_pair(
            p, c, r, bos_id=bos, eos_id=eos, seq_length=seq_length,
            max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
        )
        for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids)
    ]


def tokenize_pair(
    tokenizer,
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    seq_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_start",
) -> dict | None:
    """Tokenize one preference pair in NxDT's order (module docstring).

    Returns {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels":
    list[int], "prompt_length": int (chosen's prompt part), "rejected_prompt_length": int,
    "prompt_truncated": bool, "response_truncated": bool}, or None when an answer has no tokens.
    """
    return tokenize_pairs(
        tokenizer, [prompt], [chosen], [rejected], seq_length=seq_length,
        max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
    )[0]


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad, else EOS, else 0 (NxDT pads with 0).

    Which id pads does not change the math (labels are -100 and the attention mask is 0 there);
    it only has to be a valid embedding row.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

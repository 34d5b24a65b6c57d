"""Turn one raw dataset row into a {prompt, chosen, rejected} row of strings: pure functions.

Formats (what a row holds):
  preference  prompt, chosen, rejected: strings, passed through (checked)
  orca        system, question, chosen, rejected: the seed tutorial's ChatML strings, byte for byte
  fields      like preference, with other column names (`fields: {prompt: question, ...}`)
  hh          chosen and rejected are whole conversations that share their beginning: strings in
              the "\\n\\nHuman: ...\\n\\nAssistant: ..." form, or lists of {role, content} messages
`fields` renames columns for every format (e.g. orca data whose question column is `instruction`).

Rendering: without a chat template, strings pass through (preference, fields, hh strings) and
message lists are written in the seed's ChatML style (what orca produces). With
`chat_template`, the conversation is rendered by the tokenizer's template:
  prompt   = apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
  response = apply_chat_template(prompt_messages + response_messages, tokenize=False)
             minus its first len(prompt) characters, i.e. exactly what the template writes after
             the generation prompt (the answer and its end-of-turn token, e.g. "<|eot_id|>").
A template whose full conversation does not begin with its own generation prompt cannot be
split this way and is refused.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from recipe_runner.errors import UserError

Messages = list[dict[str, str]]

# The seed tutorial's strings (hf_llama3_8B_DPO_ORPO.rst, preference_data_format).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"
CANONICAL = {"preference": ("prompt", "chosen", "rejected"), "fields": ("prompt", "chosen", "rejected"),
             "orca": ("system", "question", "chosen", "rejected"), "hh": ("chosen", "rejected")}


class SkipRow(Exception):
    """This row cannot be used; the message is the reason, shared by every row skipped for it."""


def orca(system: str, question: str, chosen: str, rejected: str) -> dict[str, str]:
    """The seed's conversion, literally."""
    return {
        "prompt": IM_START + "\n" + system + IM_END + "\n" + IM_START + " " + question + IM_END + "\n" + IM_START + "assistant\n",
        "chosen": chosen + IM_END + "\n",
        "rejected": rejected + IM_END + "\n",
    }


def chatml_prompt(messages: Messages) -> str:
    """Messages in the seed's ChatML style, ending with the assistant's generation prompt."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(IM_START + "\n" + m["content"] + IM_END + "\n")
        elif m["role"] == "user":
            out.append(IM_START + " " + m["content"] + IM_END + "\n")
        else:
            out.append(IM_START + "assistant\n" + m["content"] + IM_END + "\n")
    return "".join(out) + IM_START + "assistant\n"


def chatml_response(messages: Messages) -> str:
    """The continuation after chatml_prompt: the first assistant turn without its header."""
    first, rest = messages[0]["content"] + IM_END + "\n", messages[1:]
    return first + (chatml_prompt(rest)[: -len(IM_START + "assistant\n")] if rest else "")


class Renderer:
    """Prompt messages + response messages -> (prompt string, response string)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer

    def __call__(self, prompt: Messages, response: Messages) -> tuple[str, str]:
        if self.tokenizer is None:
            return chatml_prompt(prompt), chatml_response(response)
        head = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(head):
            raise UserError("the tokenizer's chat template renders an assistant turn differently from its generation "
                            f"prompt (prompt ends {head[-40:]!r}, the conversation continues {full[len(head) - 40:len(head) + 20]!r}), "
                            "so responses cannot be split from prompts; use chat_template: false or another tokenizer")
        return head, full[len(head):]


def text(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise SkipRow(f"missing field {key!r}")
    if not isinstance(value, str):
        raise SkipRow(f"field {key!r} is not a string")
    if not allow_empty and not value.strip():
        raise SkipRow(f"empty field {key!r}")
    return value


def converter(fmt: str, fields: dict[str, str] | None, render: Renderer | None) -> Callable[[dict[str, Any]], dict[str, str]]:
    """The function that converts a raw row for this format; `render` None means no chat template."""
    if fmt not in CANONICAL:
        raise UserError(f"format {fmt!r}: use one of {', '.join(CANONICAL)}")
    rename = dict(fields or {})
    allowed = set(CANONICAL[fmt]) | ({"system"} if fmt in ("preference", "fields") else set())
    unknown = sorted(set(rename) - allowed)
    if unknown:
        raise UserError(f"fields: {', '.join(unknown)} not used by format {fmt} (it reads {', '.join(sorted(allowed))})")
    if fmt == "fields" and not {"prompt", "chosen", "rejected"} <= set(rename):
        raise UserError("format fields needs fields: {prompt: <column>, chosen: <column>, rejected: <column>} (system optional)")
    if fmt in ("preference", "fields") and "system" in rename and render is None:
        raise UserError("a system column only has a place in a chat template: set chat_template: true, "
                        "or use format orca for the seed's ChatML strings")

    def get(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
        return text(row, rename.get(key, key), allow_empty)

    def convert(row: dict[str, Any]) -> dict[str, str]:
        if fmt == "orca":
            system, question = get(row, "system", allow_empty=True), get(row, "question")
            chosen, rejected = get(row, "chosen"), get(row, "rejected")
            out = (orca(system, question, chosen, rejected) if render is None
                   else _render([{"role": "system", "content": system}] if system.strip() else [], question, chosen, rejected, render))
        elif fmt == "hh":
            out = hh(row.get(rename.get("chosen", "chosen")), row.get(rename.get("rejected", "rejected")), render)
        else:
            prompt, chosen, rejected = get(row, "prompt"), get(row, "chosen"), get(row, "rejected")
            if render is None:
                out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                system = get(row, "system", allow_empty=True) if "system" in rename else ""
                out = _render([{"role": "system", "content": system}] if system.strip() else [], prompt, chosen, rejected, render)
        if out["chosen"] == out["rejected"]:
            raise SkipRow("identical chosen and rejected")
        return out

    return convert


def _render(system: Messages, question: str, chosen: str, rejected: str, render: Renderer) -> dict[str, str]:
    prompt = system + [{"role": "user", "content": question}]
    head, c = render(prompt, [{"role": "assistant", "content": chosen}])
    _, r = render(prompt, [{"role": "assistant", "content": rejected}])
    return {"prompt": head, "chosen": c, "rejected": r}


# ---------------------------------------------------------------------------------------- HH
def hh(chosen: Any, rejected: Any, render: Renderer | None) -> dict[str, str]:
    """Split two conversations at their last shared assistant turn boundary."""
    if chosen is None or rejected is None:
        raise SkipRow(f"missing field {'chosen' if chosen is None else 'rejected'!r}")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, c, r = hh_split_text(chosen, rejected)
        if render is None:
            return {"prompt": prompt, "chosen": c, "rejected": r}
        prompt_msgs = hh_messages(prompt)
        if prompt_msgs and prompt_msgs[-1]["role"] == "assistant" and not prompt_msgs[-1]["content"]:
            prompt_msgs = prompt_msgs[:-1]  # the trailing "Assistant:" is the generation prompt
        c_msgs, r_msgs = hh_messages(HH_ASSISTANT + c), hh_messages(HH_ASSISTANT + r)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt_msgs, c_msgs, r_msgs = hh_split_messages(_messages(chosen, "chosen"), _messages(rejected, "rejected"))
        render = render or Renderer()
    else:
        raise SkipRow("chosen and rejected are neither both strings nor both message lists")
    head, c_text = render(prompt_msgs, c_msgs)
    _, r_text = render(prompt_msgs, r_msgs)
    return {"prompt": head, "chosen": c_text, "rejected": r_text}


def hh_split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """prompt = both strings up to and including the last "\\n\\nAssistant:" they share."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # the marker must lie wholly inside the shared part
    if cut < 0:
        raise SkipRow("no shared prefix ending in an Assistant: turn")
    end = cut + len(HH_ASSISTANT)
    c, r = chosen[end:], rejected[end:]
    if not c.strip() or not r.strip():
        raise SkipRow("empty response after the shared prefix")
    return chosen[:end], c, r


def hh_messages(conversation: str) -> Messages:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [{user: a}, {assistant: b}] (contents stripped)."""
    parts = HH_TURN.split(conversation)
    if parts[0].strip():
        raise SkipRow("text before the first Human:/Assistant: turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def hh_split_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """The shared messages before the last assistant turn where the two conversations part."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    for i in range(min(k, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[i]["role"] == "assistant" and rejected[i]["role"] == "assistant":
            c, r = chosen[i:], rejected[i:]
            if not c[0]["content"].strip() or not r[0]["content"].strip():
                raise SkipRow("empty response after the shared prefix")
            return chosen[:i], c, r
    raise SkipRow("no shared prefix ending before an assistant turn")


def _messages(value: list[Any], name: str) -> Messages:
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise SkipRow(f"{name} is a list but not of {{role, content}} string messages")
        out.append({"role": m["role"], "content": m["content"]})
    return out

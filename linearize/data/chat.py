"""Chat conversations: normalize messages from the usual dataset layouts, render them as text.

Conversations are stored as messages and rendered at packing time with the model's own chat
template, so the fine-tuning data looks exactly like what the model sees at inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ROLES", "normalize_messages", "render_messages"]

# dataset role names -> chat-template roles
ROLES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "bot": "assistant",
    "system": "system",
}


def normalize_messages(turns: Any) -> tuple[dict[str, str], ...] | None:
    """``[{"role"|"from": ..., "content"|"value": ...}, ...]`` -> messages with roles user/assistant/
    system, or ``None`` if the record is malformed (unknown role, non-string content, no user turn or
    no assistant turn).

    Consecutive turns of the same role are merged (several templates reject them); leading assistant
    turns are dropped (templates expect the user to speak first; in ShareGPT they are the tail of a
    conversation cut into parts); empty turns are dropped.
    """
    if not isinstance(turns, (list, tuple)):
        return None
    out: list[dict[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return None
        role = ROLES.get(str(turn.get("role", turn.get("from", ""))).strip().lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            return None
        if not content.strip():
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    system = [m for m in out if m["role"] == "system"][:1]
    rest = [m for m in out if m["role"] != "system"]
    while rest and rest[0]["role"] == "assistant":
        rest.pop(0)
    roles = {m["role"] for m in rest}
    if "user" not in roles or "assistant" not in roles:
        return None
    return tuple(system + rest)


def _plain(messages: Iterable[Mapping[str, str]]) -> str:
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def render_messages(messages: Iterable[Mapping[str, str]], tokenizer: Any) -> str | None:
    """The conversation as text: the tokenizer's chat template if it has one, else a plain
    ``User: ...\\nAssistant: ...`` transcript. ``None`` if the template rejects the conversation
    (e.g. a template that raises on roles it does not support): the caller skips it."""
    messages = list(messages)
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # jinja's raise_exception, TemplateError, ...: the record does not fit
            return None
        return text if isinstance(text, str) and text else None
    return _plain(messages)

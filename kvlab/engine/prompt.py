"""Prompt text: chat templates split so a shared context is encoded once.

A session's cache holds text incrementally: the conversation start up to the end of the
context, then each turn's remainder. Turns are rendered with the tokenizer's chat template
(when it has one) and only the part not yet in the cache is appended.
"""

from __future__ import annotations

from typing import Any

_SENTINEL = "\u2063KVLAB_SPLIT\u2063"
QUESTION_SEPARATOR = "\n\n"


class PromptFormat:
    """Renders conversations for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def render(self, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
        """The whole conversation, ending where the assistant's next answer starts."""
        if self.has_template:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            parts = []
            for m in messages:
                parts.append(m["content"] + ("\n" if m["role"] == "user" else "\n\n"))
            text = "".join(parts)
        return text + answer_prefix

    def context_head(self, context: str) -> str:
        """Text from the conversation start to the end of ``context`` in the first user turn."""
        full = self.render([{"role": "user", "content": context + _SENTINEL}])
        return full.split(_SENTINEL)[0]

    def encode(self, text: str, first: bool) -> list[int]:
        """Token ids of ``text``; special tokens are added only to a template-less first chunk."""
        add_special = first and not self.has_template
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    @staticmethod
    def remainder(full: str, consumed: str) -> str:
        """The part of ``full`` after what the cache already holds (``consumed``)."""
        if full.startswith(consumed):
            return full[len(consumed) :]
        common = 0
        for a, b in zip(full, consumed):
            if a != b:
                break
            common += 1
        return full[common:]

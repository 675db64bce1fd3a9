"""Text of tokens as they are generated, written piece by piece."""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Call with each list of new token ids; writes the text they add.

    A byte-level BPE token can hold part of a UTF-8 character: text ending in U+FFFD waits for
    the next tokens (`finish` writes whatever is left). tokenizer: anything with decode(ids).
    prompt: ids decoded with the new ones but not written (a token may merge with the prompt's
    last characters).
    """

    def __init__(self, tokenizer, write: Callable[[str], object], prompt: list[int] = ()):
        self.tokenizer, self.write = tokenizer, write
        self.ids = list(prompt)
        self.shown = len(tokenizer.decode(self.ids)) if self.ids else 0  # characters already written

    def __call__(self, new: list[int]) -> None:
        self.ids += new
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

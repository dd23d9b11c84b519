"""Token ids → text while they are being generated, without ever showing half a character.

Byte-level BPE tokens can end inside a UTF-8 character, which decodes to U+FFFD until the next token
completes it. `decode_stable` drops such a trailing character. `IncrementalDetokenizer` keeps a
sequence's text as it grows and decodes only the tokens since the last complete character, with the
tokens before them as context (so decoders that treat a leading space specially decode the same).
Decoding everything every step would cost O(length²) over a long completion. `streamable` is the part
of a growing text that can be shown already: stop strings the next tokens may complete are held back.
"""

from __future__ import annotations

from ..tokenizer import Tokenizer


def decode_stable(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Text of ids without a trailing incomplete UTF-8 character."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text[:-1] if text.endswith("\ufffd") else text


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest of the stop strings starts in text, if any occurs."""
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def streamable(text: str, stops: list[str]) -> str:
    """The longest prefix of text that can be sent while it is still growing: it ends before any stop
    string, and any tail that is a proper prefix of a stop string is held back (the next tokens may
    complete it)."""
    stops = [s for s in stops if s]
    cut = first_stop(text, stops)
    if cut is not None:
        return text[:cut]
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return text[:len(text) - held]


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.context = 0  # window start: the tokens decoded just before `done`, for context
        self.done = 0  # tokens whose text is in self.text (it ends on a complete character)

    def update(self, ids: list[int]) -> str:
        """The text of ids (the whole sequence so far, extending the one of the last call)."""
        if len(ids) > self.done:
            decode = self.tokenizer.decode
            before = decode(ids[self.context:self.done], skip_special_tokens=True)
            after = decode(ids[self.context:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self.context, self.done = self.done, len(ids)
        return self.text

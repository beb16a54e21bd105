"""Incremental detokenisation of one sequence's output, with stop strings."""

from __future__ import annotations

# Prompt tokens decoded with the first outputs, so tokenizers that render a token by its neighbours
# (SentencePiece's leading space) give the same text as decoding everything at once.
_CONTEXT_TOKENS = 5


class Detokenizer:
    """Turns a sequence's output tokens, one at a time, into text deltas.

    Only complete text is released: text ending in U+FFFD (a multi-byte character split across tokens) waits
    for the next token, and an end of the text that could be the start of a stop string waits until it is
    resolved. When a stop string appears (also across token boundaries) the text is cut before it (after it
    with include_stop), the stop string is not emitted (is, with include_stop) and `stopped` names it; the
    caller then finishes the sequence with "stop".

    tokenizer: anything with decode(ids, skip_special_tokens=...) -> str.
    """

    def __init__(self, tokenizer, prompt_token_ids=(), stop=(), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0):
        """min_tokens: stop strings count only from the token that makes the output that long (vLLM's)."""
        self.tokenizer = tokenizer
        self._stop = tuple(stop)
        self.min_tokens = min_tokens
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        context = list(prompt_token_ids)[-_CONTEXT_TOKENS:]
        self._ids = context
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] is context decoded with the new tokens
        self._read_offset = len(context)  # ids from here on are not yet in _text
        self._text = ""  # decoded output text (complete characters), released or held back
        self._released = 0  # len of _text handed out as deltas
        self._count = 0  # output tokens added
        self.stopped: str | None = None

    @property
    def stop(self) -> tuple[str, ...]:
        """The stop strings in force: none before min_tokens output tokens."""
        return self._stop if self._count >= self.min_tokens else ()

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[:self._released]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> str:
        """The text that token_id completes (possibly ""). After a stop string, nothing more comes."""
        if self.stopped is not None:
            return ""
        self._ids.append(int(token_id))
        self._count += 1
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        elif self.stop:
            # Text waiting on a split character may already hold a stop string (a run of tokens that each
            # complete one character and start the next): it ends the text at this token, not at flush().
            held = self._text + full[len(prefix):].rstrip("\ufffd")
            if any(s in held[self._released:] for s in self.stop):
                self._text = held
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back text, when the sequence ends for another reason than a stop string."""
        if self.stopped is not None:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        self._text += full[len(prefix):]
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, start = self._text, self._released
        # Released text never ends in the start of a stop string, so a stop string starts after it.
        hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
        if hits:
            cut, self.stopped = min(hits)
            cut += len(self.stopped) if self.include_stop else 0
            self._text = text[:cut]
            self._released = cut
            return text[start:cut]
        end = len(text) if final else len(text) - _partial_stop(text[start:], self._stop)
        self._released = end
        return text[start:end]


def _partial_stop(text: str, stop) -> int:
    """Length of the longest end of text that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best

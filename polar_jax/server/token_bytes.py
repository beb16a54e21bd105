"""Each token's own bytes, and where each token starts in the text, for OpenAI's logprobs fields.

A token may hold part of a character (byte-level BPE splits an emoji into up to four tokens), so decoding it
alone gives U+FFFD. OpenAI's chat `bytes` field carries the token's raw UTF-8 bytes so that a client can
rebuild the text, and the completions `text_offset` indexes into the returned text. Both come from the
token's vocabulary entry:
  byte-level BPE (GPT-2, LLaMA-3, SmolLM2, Qwen: the tokenizer's decoder is ByteLevel): each character of
      the entry stands for one byte (GPT-2's bytes_to_unicode table);
  SentencePiece byte fallback: an entry <0xHH> is the byte HH; "▁" is a space;
  anything else: the entry's UTF-8 encoding.
"""

from __future__ import annotations

import codecs
import functools
import json
import re

from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (transformers' own table)."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


class TokenBytes:
    """bytes_of(token id) for one tokenizer (its kind found once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self.special = frozenset(getattr(tokenizer, "all_special_ids", None) or ())
        self.strips_first_space = self._strips_first_space()

    def bytes_of(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if self.byte_level:
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_str(self, token_id: int) -> str:
        """The token as logprobs name it: its own text, a SentencePiece word's leading space included (decoding
        the token alone drops it), U+FFFD for part of a character."""
        return self.bytes_of(token_id).decode("utf-8", "replace")

    def text_bytes_of(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        """What the token adds to decoded text: nothing for a special token where decoding skips them."""
        return b"" if skip_special_tokens and int(token_id) in self.special else self.bytes_of(token_id)

    def _strips_first_space(self) -> bool:
        """SentencePiece decoders drop the leading space of a text's first word piece; byte-level ones keep it."""
        ids = self.tokenizer.encode("Hello world", add_special_tokens=False)
        joined = b"".join(self.text_bytes_of(i) for i in ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True).encode()
        return joined != text and joined[:1] == b" " and joined[1:] == text


class TextOffsets:
    """Where each token starts in the decoded text, in characters, over a stream of token ids: a token that
    ends inside a character counts from that character's start, a special token takes no room (calls
    continue where the last one ended), unless the text keeps them (`skip_special_tokens` False).
    `decoded_start`: the text begins with a decoding of these tokens (an echoed prompt), which drops a
    SentencePiece tokenizer's first leading space."""

    def __init__(self, token_bytes: TokenBytes, decoded_start: bool = False, skip_special_tokens: bool = True):
        self.token_bytes = token_bytes
        self.skip_special_tokens = skip_special_tokens
        self.strip = decoded_start and token_bytes.strips_first_space
        self.pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def offsets(self, token_ids: list[int]) -> list[int]:
        out = []
        for t in token_ids:
            b = self.token_bytes.text_bytes_of(t, self.skip_special_tokens)
            if self.strip and b:
                b, self.strip = (b[1:] if b[:1] == b" " else b), False
            out.append(self.pos)
            self.pos += len(self._decoder.decode(b))
        return out

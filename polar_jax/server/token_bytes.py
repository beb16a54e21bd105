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


class TextOffsets:
    """Where each token starts in the decoded text, in characters, over a stream of token bytes: a token that
    ends inside a character counts from that character's start (calls continue where the last one ended)."""

    def __init__(self):
        self.pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def offsets(self, token_bytes: list[bytes]) -> list[int]:
        out = []
        for b in token_bytes:
            out.append(self.pos)
            self.pos += len(self._decoder.decode(b))
        return out

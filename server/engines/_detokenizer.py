"""Token IDs -> text, one token at a time, for engines that decode themselves.

Decoding each token alone is wrong twice over: a byte-level token can hold part of a
UTF-8 character, and SentencePiece tokenizers drop a token's leading space when it
starts the decoded span. So each token is decoded together with the tokens before it
(the technique of vLLM's and TGI's incremental detokenizers), and text ending in an
incomplete character is held until the character is complete.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # Text is decoded over ids[_prefix:]; ids[_prefix:_read] were already released.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        released, text = self._decode_window()
        if len(text) > len(released) and not text.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(released) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held, incomplete characters included: the sequence has ended."""
        released, text = self._decode_window()
        self._prefix = self._read = len(self._ids)
        return text[len(released) :]

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        released = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        return released, decode(self._ids[self._prefix :], skip_special_tokens=True)

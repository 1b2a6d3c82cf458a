"""Stop sequences cut out of a completion that is released piece by piece.

The contract returns text *without* the stop sequence, in streaming mode too, so text
that might be the start of a stop sequence cannot be sent until the next tokens show
whether it is. vLLM does this inside its own detokenizer; engines that decode
themselves use this filter.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopSequenceFilter:
    """One completion's text: what is safe to send now, and where a stop sequence ends it."""

    def __init__(self, stops: Iterable[str]):
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; returns (text safe to send, whether a stop sequence matched).

        After a match the completion is over: the text before the earliest stop sequence
        is released and everything from it on is dropped.
        """
        if not self._stops:
            return text, False
        buffer = self._held + text
        matches = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if matches:
            self._held = ""
            return buffer[: min(matches)], True
        held = self._longest_stop_prefix_at_end(buffer)
        self._held = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        """The text held back, released because the completion ended another way."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_at_end(self, buffer: str) -> int:
        longest = min(len(buffer), max(len(stop) for stop in self._stops) - 1)
        for size in range(longest, 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0

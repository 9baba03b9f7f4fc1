"""Incremental detokenization for streams: text is released only once its UTF-8 bytes are
complete, and text that could be the start of a stop string is held back until it is not."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class StopStringMatcher:
    """Finds stop strings across chunk boundaries. `feed` returns the text safe to emit now;
    after a match, `stopped` is True and the text from the stop string on is dropped
    (OpenAI semantics: the stop string is not part of the output)."""

    __slots__ = ("_stops", "_held", "stopped", "matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text if self._held else text
        # A match must end in the new text: the held part alone matched nothing before.
        first = -1
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (first == -1 or i < first):
                first = i
                self.matched = stop
        if first != -1:
            self.stopped = True
            self._held = ""
            return buf[:first]
        keep = self._partial_suffix(buf)
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep]
        self._held = ""
        return buf

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of generation the held text is output after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas. One per request; not thread-safe."""

    __slots__ = ("_tokenizer", "_stream", "_stops", "has_stop_strings")

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        # DecodeStream (Rust) keeps the prefix/read offsets and returns None while a
        # multi-byte character is still incomplete.
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stops = StopStringMatcher(stop) if stop else None
        # A plain attribute: callers test it per token before asking `stopped`.
        self.has_stop_strings = self._stops is not None

    @property
    def stopped(self) -> bool:
        return self._stops is not None and self._stops.stopped

    @property
    def matched(self) -> str | None:
        """The stop string that ended the text, once `stopped`."""
        return self._stops.matched if self._stops is not None else None

    def step(self, token_ids: Sequence[int]) -> str:
        """Text that became final with these tokens ("" when nothing did)."""
        tokenizer, stream = self._tokenizer, self._stream
        if len(token_ids) == 1:
            text = stream.step(tokenizer, token_ids[0]) or ""
        else:
            text = "".join(filter(None, (stream.step(tokenizer, t) for t in token_ids)))
        if self._stops is None:
            return text
        return self._stops.feed(text)

    def flush(self) -> str:
        """Held-back text once the stream ended without a stop string."""
        return self._stops.flush() if self._stops is not None else ""

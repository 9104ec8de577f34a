"""Incremental detokenization of one request's tokens into text deltas, with stop strings.

Text is emitted only when it is final: never half a multi-byte character (a byte-level token
can carry part of one) and never text that might still turn out to begin a stop string.
The deltas concatenate to tokenizer.decode(ids, skip_special_tokens=True), cut at the first
stop string. Decoding never applies clean_up_tokenization_spaces: that rewrite looks across
token boundaries, so it cannot be done incrementally (and it changes what the model wrote).
"""
from collections.abc import Iterable

REPLACEMENT = "\ufffd"   # what a decoder yields for an incomplete UTF-8 sequence


class StopStrings:
    """Finds the first stop string in streamed text, holding back a possible start of one."""

    def __init__(self, stops: Iterable[str]):
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The text that is now safe to emit; once a stop string matched, nothing more."""
        if self.matched is not None:
            return ""
        if not self._stops:
            return text
        # Text already emitted ends with no possible stop-string start, so any match begins here.
        buf = self._held + text
        hits = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits)
            self._held = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of the stream a held partial match is plain text."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_suffix(self, buf: str) -> int:
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0


class Detokenizer:
    """One request's token ids -> text deltas."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self._tok = tokenizer
        self._ids: list[int] = []
        # The decode window starts at _prefix, a character boundary one step behind the newest
        # tokens: decoders such as SentencePiece need that context for leading spaces.
        # _offset chars of the window's text are already out; _read is where the next window starts.
        self._prefix = 0
        self._read = 0
        self._offset = 0
        self._stop = StopStrings(stop)
        self.text = ""          # everything emitted so far

    @property
    def stopped(self) -> bool:
        return self._stop.matched is not None

    def push(self, ids: Iterable[int]) -> str:
        """Add newly generated ids; returns the text delta that became final."""
        if self.stopped:
            return ""
        self._ids.extend(ids)
        return self._emit(self._stop.feed(self._decode_new(final=False)))

    def finish(self) -> str:
        """The stream ended: release whatever is held back."""
        if self.stopped:
            return ""
        return self._emit(self._stop.feed(self._decode_new(final=True)) + self._stop.flush())

    def _decode_new(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window = self._decode(self._ids[self._prefix:])
        # a trailing U+FFFD is probably a character split over tokens: wait for its other bytes
        safe = window if final else window.rstrip(REPLACEMENT)
        delta = safe[self._offset:]
        self._offset = len(safe)
        if len(safe) == len(window):    # the window ends on a character: slide it forward
            self._prefix, self._read = self._read, len(self._ids)
            self._offset = len(self._decode(self._ids[self._prefix:]))
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _emit(self, text: str) -> str:
        self.text += text
        return text

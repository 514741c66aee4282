"""Generated token ids -> text pieces to send, with OpenAI ``stop`` strings.

The engine calls :meth:`TextStream.update` after every token. It decodes everything generated so
far and sends only text that can no longer change: it holds back an unfinished multi-byte
character (decoded as U+FFFD) and any ending that could still grow into a stop string. The
concatenation of the pieces is therefore the same whether a client streams or not.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Incremental detokenizer for one request. ``stop``: strings that end the completion (not included)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = ""

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """``(new_text, stopped)``: the text to send now, and whether a stop string ended the completion."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i != -1]
        stopped = bool(hits)
        if stopped:
            text, final = text[: min(hits)], True
        if not final:
            if text.endswith(REPLACEMENT):
                return "", False
            text = text[: len(text) - self._held_back(text)]
        if not text.startswith(self.sent):
            # The decoder rewrote text it had already produced (rare clean-up rules). What was sent
            # stays sent; continue after it so the pieces still add up to one consistent string.
            text = self.sent + text[len(self.sent):]
        piece = text[len(self.sent):]
        self.sent += piece
        return piece, stopped

    def _held_back(self, text: str) -> int:
        """Length of the longest ending of ``text`` that is the start of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

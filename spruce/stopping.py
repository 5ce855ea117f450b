"""When a request stops, and what text it returns.

Order of checks for each appended token: EOS / stop token ids (the token is kept in ``token_ids``, not
shown in text), stop strings (the text is cut before the stop string; the token that completed it is
kept in ``token_ids``), then ``max_tokens`` and the context limit (finish reason "length").
"""

from __future__ import annotations

from collections.abc import Iterable

from spruce.config import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# stopped from outside: client cancellation, Abort, a passed deadline, server shutdown
FINISH_ABORT = "abort"


class StopChecker:
    def __init__(self, tokenizer, params: SamplingParams, eos_ids: Iterable[int], limit: int) -> None:
        """``limit``: the most tokens this request may generate (max_tokens capped by the context)."""
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.limit = limit
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        # index in the decoded text where a stop string starts, if one was found
        self._stop_at: int | None = None

    @property
    def remaining(self) -> int:
        return self.limit - len(self.generated)

    def extend(self, tokens: list[int]) -> int:
        """Append tokens one by one until a stop condition; returns how many were kept."""
        kept = 0
        for token in tokens:
            if self.finish_reason is not None:
                break
            self.generated.append(token)
            kept += 1
            if token in self.stop_ids:
                self.finish_reason = FINISH_STOP
            elif self.params.stop and self._find_stop_string():
                self.finish_reason = FINISH_STOP
            elif len(self.generated) >= self.limit:
                self.finish_reason = FINISH_LENGTH
        return kept

    def _find_stop_string(self) -> bool:
        # the whole text is searched each time: a partial UTF-8 character can decode to a different
        # length until it completes, so offsets from earlier decodes are not safe to resume from
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        hits = [i for s in self.params.stop if (i := text.find(s)) >= 0]
        if hits:
            self._stop_at = min(hits)
            return True
        return False

    def text(self) -> str:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        return text if self._stop_at is None else text[: self._stop_at]

    def abort(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = FINISH_ABORT

    def stable_text(self) -> str:
        """The text so far minus what may still change: a trailing incomplete UTF-8 character (decoded
        as U+FFFD) and, while running, a trailing piece that could be the start of a stop string (it
        would be cut if the stop string completes). Streaming sends only this, so text already sent is
        always a prefix of the final text."""
        text = self.text()
        if self.finish_reason is not None:
            return text
        text = text.rstrip("\ufffd")
        for stop in self.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[:-k]
                    break
        return text

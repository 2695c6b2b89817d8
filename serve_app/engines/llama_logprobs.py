"""OpenAI ``logprobs`` for the llama.cpp engine, without ``logits_all``.

llama-cpp-python 0.3 reports logprobs only for a model built with ``logits_all=True``, which keeps the
logits of every position and slows every request. Instead ``TrackedLlama.generate`` (llama_cpp.py) reads,
as each sampled token comes out, the one row of logits it was sampled from, and keeps a ``TokenLogprob``
per token on the request's tracker, so a preempted request keeps those of the tokens it later replays.
This module turns them into OpenAI's shapes, token for token with the text the client receives.

The numbers are the model's own distribution (a log-softmax of its logits), before temperature, top_p,
penalties and grammars, as vLLM reports them by default: under ``response_format`` or tools the chosen
token need not be among the most likely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class TokenLogprob:
    piece: bytes  # the token's text, as the completion has it
    logprob: float
    top: tuple[tuple[bytes, float], ...]  # the k most likely tokens, most likely first


Taken = list[tuple[int, TokenLogprob]]  # (text_offset, token)


class LogprobReader:
    """A sampled token's ``TokenLogprob``, from the row of logits it was sampled from. One per model, used
    by one thread at a time (the one holding the model)."""

    def __init__(self, n_vocab: int, detokenize: Callable[[int, bool], bytes]) -> None:
        # Reused: allocating a fresh 400 kB array per token cost ~0.3 ms, as much as the rest together.
        self._scratch = np.empty(n_vocab, dtype=np.float64)
        self._detokenize = detokenize  # (token, special) → its text
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def read(self, logits: npt.NDArray[np.float32], token: int, k: int) -> TokenLogprob:
        """``token``'s log probability and the ``k`` most likely tokens (a log-softmax of ``logits``)."""
        peak = float(logits.max())
        # float64: a sum of 49k exponentials in float32 loses the digits small probabilities live in.
        np.subtract(logits, peak, out=self._scratch, dtype=np.float64)
        log_total = peak + float(np.log(np.exp(self._scratch, out=self._scratch).sum()))
        top = np.argpartition(logits, logits.size - k)[logits.size - k:] if k else np.empty(0, dtype=np.intp)
        top = top[np.argsort(-logits[top], kind="stable")]
        # Alternatives show special tokens by name ("<|im_end|>"), not as the empty text answers give them.
        return TokenLogprob(self._piece(token, False), float(logits[token]) - log_total,
                            tuple((self._piece(int(t), True), float(logits[t]) - log_total) for t in top))

    def _piece(self, token: int, special: bool) -> bytes:
        key = (token, special)
        if key not in self._pieces:
            self._pieces[key] = self._detokenize(token, special)
        return self._pieces[key]


class Cover:
    """Hands out a choice's tokens along the text its client receives, so that the tokens reported cover
    exactly that text. ``tokens`` may still be growing (a stream reads them while the model runs), but
    every token of a piece of text is there before the piece is handed out.

    llama-cpp-python cuts text on token boundaries except where a stop string begins inside a token: that
    token is reported cut to the end of the text (shorter ``bytes`` and text; its log probabilities are
    the whole token's), and the tokens after it, which spelled the stop string, are not reported."""

    def __init__(self, tokens: Sequence[TokenLogprob], offset: int = 0) -> None:
        self._tokens = tokens
        self._taken = 0
        self._start = 0  # bytes of text before the next token
        self._bytes = 0  # bytes of text received
        self._chars = offset  # characters before the text received, then of it (``text_offset``)

    def take(self, text: str) -> Taken:
        """The tokens that make up ``text``, the next piece of the answer, with their text offsets."""
        data = text.encode()
        piece_start, piece_chars = self._bytes, self._chars
        self._bytes += len(data)
        self._chars += len(text)
        taken: Taken = []
        while self._taken < len(self._tokens):
            token = self._tokens[self._taken]
            end = self._start + len(token.piece)
            if self._start >= self._bytes and end > self._bytes:
                break  # not begun
            before = data[:max(self._start - piece_start, 0)]
            if end > self._bytes:
                token = replace(token, piece=token.piece[:self._bytes - self._start])
            taken.append((piece_chars + len(before.decode(errors="ignore")), token))
            self._taken += 1
            self._start = end
        return taken


def render(taken: Taken, *, chat: bool) -> dict[str, Any]:
    return _chat(taken) if chat else _legacy(taken)


def annotator(tokens: Sequence[TokenLogprob], *, chat: bool, offset: int = 0
              ) -> Callable[[str], dict[str, Any] | None]:
    """A stream's logprobs, piece by piece: each chunk carries those of the tokens whose text it carries."""
    cover = Cover(tokens, offset)

    def annotate(text: str) -> dict[str, Any] | None:
        taken = cover.take(text)
        return render(taken, chat=chat) if taken or text else None

    return annotate


def _chat(taken: Taken) -> dict[str, Any]:
    return {"content": [{**_token(t.piece, t.logprob), "top_logprobs": [_token(*alt) for alt in t.top]}
                        for _, t in taken],
            "refusal": None}


def _token(piece: bytes, logprob: float) -> dict[str, Any]:
    return {"token": piece.decode(errors="replace"), "logprob": logprob, "bytes": list(piece)}


def _legacy(taken: Taken) -> dict[str, Any]:
    """The completions API's older shape: parallel lists, alternatives as {text: logprob}."""
    return {"tokens": [t.piece.decode(errors="replace") for _, t in taken],
            "token_logprobs": [t.logprob for _, t in taken],
            "top_logprobs": [_alternatives(t) for _, t in taken],
            "text_offset": [offset for offset, _ in taken]}


def _alternatives(token: TokenLogprob) -> dict[str, float]:
    # As OpenAI: the k most likely and always the chosen one (so up to k + 1). Tokens whose texts look
    # alike (partial characters) share a key; the likelier one keeps it.
    alternatives: dict[str, float] = {}
    for piece, logprob in (*token.top, (token.piece, token.logprob)):
        alternatives.setdefault(piece.decode(errors="replace"), logprob)
    return alternatives

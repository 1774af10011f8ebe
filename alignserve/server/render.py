"""Decode events -> wire objects: full responses and stream chunks, for chat and completions."""

from __future__ import annotations

import math
from typing import Any

from alignserve.decoding.base import ChoiceFinal, RequestSummary
from alignserve.server.prepare import Prepared
from alignserve.server.protocol import (
    AlignmentReport,
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobToken,
    ChatStreamChoice,
    ChoiceAlignment,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)

Chunk = ChatCompletionChunk | CompletionChunk


def dump_chunk(chunk: Chunk) -> dict[str, Any]:
    """A chunk as JSON-ready data: `alignment` and `usage` appear only where they are set."""
    data = chunk.model_dump()
    for key in ("usage", "alignment"):
        if data.get(key) is None:
            data.pop(key, None)
    for choice in data["choices"]:
        if choice.get("alignment") is None:
            choice.pop("alignment", None)
        if "delta" in choice:  # OpenAI sends only the delta fields that are present
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return data


def _finite(x: float) -> float:
    # JSON has no -Infinity; vLLM clamps the same way.
    return max(float(x), -9999.0) if not math.isnan(x) else -9999.0


def parse_logprob(entry: Any) -> tuple[int, float, list[tuple[int, float]]]:
    """One logprob entry -> (token id, logprob, [(top id, logprob)]).

    Accepts the engine's `{"token_id", "logprob", "top": [(id, lp)]}` and the strategies'
    formatted `{"token_id", "logprob", "top_logprobs": [{"token_id", "logprob", ...}]}`.
    """
    if isinstance(entry, dict):
        token_id, logprob = entry.get("token_id", entry.get("id")), entry.get("logprob", 0.0)
        top = entry.get("top", entry.get("top_logprobs")) or []
    else:  # a (token_id, logprob[, top]) tuple
        token_id, logprob, top = entry[0], entry[1], (entry[2] if len(entry) > 2 else [])
    if isinstance(top, dict):
        top = list(top.items())
    pairs = [(t["token_id"], t["logprob"]) if isinstance(t, dict) else (t[0], t[1]) for t in top]
    return int(token_id), _finite(logprob), [(int(t), _finite(lp)) for t, lp in pairs]


def choice_alignment(final: ChoiceFinal) -> ChoiceAlignment:
    reward = None if final.reward is None else float(final.reward)
    return ChoiceAlignment(reward=reward,
                           components={k: float(v) for k, v in final.components.items()})


def report(summary: RequestSummary) -> AlignmentReport:
    return AlignmentReport(strategy=summary.strategy, candidates_scored=summary.candidates_scored,
                           model_tokens=summary.model_tokens,
                           reward_seconds=round(summary.reward_seconds, 6),
                           seconds=round(summary.seconds, 6), search=summary.search)


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


class Renderer:
    """Shapes one request's output; `kind` picks chat or completions wire objects."""

    def __init__(self, prepared: Prepared, tokenizer: Any) -> None:
        self.p = prepared
        self.tokenizer = tokenizer
        self.offsets: dict[int, int] = {}  # completions: text_offset reached per choice

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- logprobs

    def chat_logprobs(self, entries: list[Any]) -> ChatChoiceLogprobs | None:
        if self.p.decode.sampling.logprobs is None:
            return None
        content = []
        for entry in entries:
            token_id, logprob, top = parse_logprob(entry)
            text = self._token(token_id)
            content.append(ChatLogprobToken(
                token=text, logprob=logprob, bytes=list(text.encode()),
                top_logprobs=[TopLogprob(token=(t := self._token(i)), logprob=lp,
                                         bytes=list(t.encode())) for i, lp in top]))
        return ChatChoiceLogprobs(content=content)

    def completion_logprobs(self, index: int, entries: list[Any]) -> CompletionLogprobs | None:
        if self.p.decode.sampling.logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self.offsets.get(index, len(self.p.echo))
        for entry in entries:
            token_id, logprob, top = parse_logprob(entry)
            text = self._token(token_id)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.text_offset.append(offset)
            ranked = {self._token(i): lp for i, lp in top}
            ranked.setdefault(text, logprob)  # vLLM lists the chosen token among the top ones
            out.top_logprobs.append(ranked)
            offset += len(text)
        self.offsets[index] = offset
        return out

    # -- whole responses

    def response(self, finals: list[ChoiceFinal], summary: RequestSummary) -> dict[str, Any]:
        use = usage(summary.prompt_tokens, sum(len(f.token_ids) for f in finals))
        common: dict[str, Any] = {"id": self.p.request_id, "created": self.p.created,
                                  "model": self.p.model, "usage": use,
                                  "alignment": report(summary)}
        if self.p.kind == "chat":
            chat_choices = [ChatChoice(index=f.index, message=AssistantMessage(content=f.text),
                                       logprobs=self.chat_logprobs(f.logprobs),
                                       finish_reason=f.finish_reason,
                                       alignment=choice_alignment(f)) for f in finals]
            return ChatCompletionResponse(choices=chat_choices, **common).model_dump()
        text_choices = [CompletionChoice(index=f.index, text=self.p.echo + f.text,
                                         logprobs=self.completion_logprobs(f.index, f.logprobs),
                                         finish_reason=f.finish_reason,
                                         alignment=choice_alignment(f)) for f in finals]
        return CompletionResponse(choices=text_choices, **common).model_dump()

    # -- stream chunks

    def _chunk(self, choices: list[Any]) -> Chunk:
        if self.p.kind == "chat":
            return ChatCompletionChunk(id=self.p.request_id, created=self.p.created,
                                       model=self.p.model, choices=choices)
        return CompletionChunk(id=self.p.request_id, created=self.p.created, model=self.p.model,
                               choices=choices)

    def opening(self, index: int) -> Chunk | None:
        """Chat: the assistant role, as vLLM sends first; completions: the echoed prompt."""
        if self.p.kind == "chat":
            return self._chunk([ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content=""))])
        if self.p.echo:
            return self._chunk([CompletionStreamChoice(index=index, text=self.p.echo)])
        return None

    def delta(self, index: int, text: str, logprobs: list[Any]) -> Chunk:
        if self.p.kind == "chat":
            return self._chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=text),
                                                 logprobs=self.chat_logprobs(logprobs))])
        return self._chunk([CompletionStreamChoice(
            index=index, text=text, logprobs=self.completion_logprobs(index, logprobs))])

    def finish(self, final: ChoiceFinal) -> Chunk:
        if self.p.kind == "chat":
            return self._chunk([ChatStreamChoice(index=final.index, delta=DeltaMessage(),
                                                 finish_reason=final.finish_reason,
                                                 alignment=choice_alignment(final))])
        return self._chunk([CompletionStreamChoice(index=final.index, text="",
                                                   finish_reason=final.finish_reason,
                                                   alignment=choice_alignment(final))])

    def closing(self, use: UsageInfo | None, summary: RequestSummary) -> Chunk:
        """The usage chunk (empty choices), carrying the request's alignment report."""
        chunk = self._chunk([])
        if use is not None:
            chunk.usage = use
        chunk.alignment = report(summary)
        return chunk

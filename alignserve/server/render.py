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
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    TopLogprob,
    UsageInfo,
)
from alignserve.server.structured import ParsedAnswer, parse_tool_calls

Chunk = ChatCompletionChunk | CompletionChunk


def dump_chunk(chunk: Chunk) -> dict[str, Any]:
    """A chunk as JSON-ready data: `alignment` and `usage` appear only where they are set."""
    data = chunk.model_dump()
    for key in ("usage", "alignment", "prompt_token_ids"):
        if data.get(key) is None:
            data.pop(key, None)
    for choice in data["choices"]:
        for key in ("alignment", "token_ids", "prompt_token_ids"):
            if choice.get(key) is None:
                choice.pop(key, None)
        if "delta" in choice:  # OpenAI sends only the delta fields that are present
            choice["delta"] = _present(choice["delta"])
    return data


def _present(value: Any) -> Any:
    """Drop None fields, nested ones too (a tool call's later pieces carry no id or name)."""
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_present(v) for v in value]
    return value


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


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2 and its descendants) spells every byte as one printable
    character; this maps each of those characters back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    """A token's own bytes, which its decoded text loses when the token holds part of a
    multi-byte character (decoding gives U+FFFD): clients rebuild text from these."""

    _BYTE_LEVEL = _byte_alphabet()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = getattr(tokenizer, "get_vocab", dict)()
        self.byte_level = "\u0120" in "".join(list(vocab)[:50000]) if vocab else False
        self.cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        out = self.cache.get(token_id)
        if out is None:
            out = self.cache[token_id] = self._raw(token_id, text)
        return out

    def _raw(self, token_id: int, text: str) -> list[int]:
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        except Exception:  # noqa: BLE001  (no piece: the text is all there is)
            piece = None
        if not isinstance(piece, str):
            return list(text.encode())
        if self.byte_level and all(c in self._BYTE_LEVEL for c in piece):
            return [self._BYTE_LEVEL[c] for c in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:  # SentencePiece byte fallback
                return [int(piece[3:5], 16)]
            except ValueError:
                pass
        if "\ufffd" in text:  # SentencePiece's piece is its text, with ▁ for a space
            return list(piece.replace("\u2581", " ").encode())
        return list(text.encode())


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
        self.token_bytes = TokenBytes(tokenizer)
        self.offsets: dict[int, int] = {}  # completions: text_offset reached per choice
        self.answers: dict[int, ParsedAnswer] = {}  # tool calls parsed per choice
        self.started: set[int] = set()  # completions choices whose first chunk went out

    # -- tool calls

    @property
    def holds_text(self) -> bool:
        """A stream with tools sends each choice's text once it is whole: only then can its
        calls be told from content (the grammar guarantees they parse)."""
        return self.p.kind == "chat" and bool(self.p.tool_names)

    def answer(self, final: ChoiceFinal) -> ParsedAnswer | None:
        """The finished text split into content and tool calls (None: no tools asked)."""
        if not self.p.tool_names:
            return None
        if final.index not in self.answers:
            self.answers[final.index] = parse_tool_calls(final.text, self.p.tool_names)
        return self.answers[final.index]

    def finish_reason(self, final: ChoiceFinal) -> str | None:
        parsed = self.answer(final)
        if parsed is None:
            return final.finish_reason
        reason = parsed.finish_reason(final.finish_reason)
        return "function_call" if reason == "tool_calls" and self.p.legacy_functions else reason

    def message(self, final: ChoiceFinal) -> AssistantMessage:
        parsed = self.answer(final)
        if parsed is None:
            return AssistantMessage(content=final.text)
        if self.p.legacy_functions:  # one call at most (the grammar allows no second)
            call = parsed.tool_calls[0].function if parsed.tool_calls else None
            return AssistantMessage(content=parsed.content, function_call=call)
        return AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls or None)

    def tool_call_chunks(self, final: ChoiceFinal) -> list[Chunk]:
        """A whole choice as OpenAI streams it: its content, then per call one chunk with the
        call's index, id and function name, and one with its arguments."""
        parsed = self.answer(final)
        out: list[Chunk] = []
        if parsed.content:
            out.append(self._chunk([ChatStreamChoice(index=final.index,
                                                     delta=DeltaMessage(content=parsed.content))]))
        if self.p.legacy_functions:
            for call in parsed.tool_calls[:1]:
                out += [self._chunk([ChatStreamChoice(index=final.index, delta=DeltaMessage(
                    function_call=piece))]) for piece in (
                        DeltaFunction(name=call.function["name"], arguments=""),
                        DeltaFunction(arguments=call.function["arguments"]))]
            return out
        for i, call in enumerate(parsed.tool_calls):
            head = DeltaToolCall(index=i, id=call.id, type="function",
                                 function=DeltaFunction(name=call.function["name"], arguments=""))
            body = DeltaToolCall(index=i, function=DeltaFunction(
                arguments=call.function["arguments"]))
            out += [self._chunk([ChatStreamChoice(index=final.index,
                                                  delta=DeltaMessage(tool_calls=[piece]))])
                    for piece in (head, body)]
        return out

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int, text: str) -> list[int]:
        return self.token_bytes(token_id, text)

    # -- logprobs

    def chat_logprobs(self, entries: list[Any]) -> ChatChoiceLogprobs | None:
        if self.p.decode.sampling.logprobs is None:
            return None
        content = []
        for entry in entries:
            token_id, logprob, top = parse_logprob(entry)
            text = self._token(token_id)
            content.append(ChatLogprobToken(
                token=text, logprob=logprob, bytes=self._bytes(token_id, text),
                top_logprobs=[TopLogprob(token=(t := self._token(i)), logprob=lp,
                                         bytes=self._bytes(i, t)) for i, lp in top]))
        return ChatChoiceLogprobs(content=content)

    def completion_logprobs(self, index: int, entries: list[Any],
                            prompt: list[Any] | None = None) -> CompletionLogprobs | None:
        """`prompt`: the echoed prompt's own entries (the first None), put first as vLLM does."""
        if self.p.decode.sampling.logprobs is None:
            return None
        out = CompletionLogprobs()
        if prompt is not None:
            offset = 0
            for entry in prompt:
                if entry is None:  # nothing predicts a sequence's first token
                    token_id = self._prompt_ids(index)[0]
                    text = self._token(token_id)
                    out.tokens.append(text)
                    out.token_logprobs.append(None)
                    out.top_logprobs.append(None)
                    out.text_offset.append(offset)
                    offset += len(text)
                    continue
                offset = self._completion_entry(out, entry, offset)
            self.offsets[index] = len(self.p.echo(index))
        offset = self.offsets.get(index, len(self.p.echo(index)))
        for entry in entries:
            offset = self._completion_entry(out, entry, offset)
        self.offsets[index] = offset
        return out

    def _completion_entry(self, out: CompletionLogprobs, entry: Any, offset: int) -> int:
        token_id, logprob, top = parse_logprob(entry)
        text = self._token(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.text_offset.append(offset)
        ranked = {self._token(i): lp for i, lp in top}
        ranked.setdefault(text, logprob)  # vLLM lists the chosen token among the top ones
        out.top_logprobs.append(ranked)
        return offset + len(text)

    # -- whole responses

    def prompt_entries(self, index: int, prompts: dict[int, list]) -> list | None:
        """The echoed prompt's log-prob entries for choice `index` (None: not asked for)."""
        return prompts.get(index // self.p.decode.n) if self.p.prompt_logprobs else None

    def response(self, finals: list[ChoiceFinal], summary: RequestSummary,
                 prompt_logprobs: dict[int, list] | None = None) -> dict[str, Any]:
        """`prompt_logprobs`: prompt index -> its own entries (completions, echo + logprobs)."""
        prompts = prompt_logprobs or {}
        use = usage(summary.prompt_tokens, sum(len(f.token_ids) for f in finals))
        common: dict[str, Any] = {"id": self.p.request_id, "created": self.p.created,
                                  "model": self.p.model, "usage": use,
                                  "alignment": report(summary)}
        if self.p.kind == "chat":
            chat_choices = [ChatChoice(index=f.index, message=self.message(f),
                                       logprobs=self.chat_logprobs(f.logprobs),
                                       finish_reason=self.finish_reason(f),
                                       alignment=choice_alignment(f)) for f in finals]
            data = ChatCompletionResponse(choices=chat_choices, **common).model_dump()
            for choice in data["choices"]:  # present only when there are calls, as OpenAI
                for key in ("tool_calls", "function_call"):
                    if choice["message"].get(key) is None:
                        choice["message"].pop(key, None)
            return self._with_token_ids(data, finals)
        text_choices = [CompletionChoice(index=f.index, text=self.p.echo(f.index) + f.text,
                                         logprobs=self.completion_logprobs(
                                             f.index, f.logprobs,
                                             self.prompt_entries(f.index, prompts)),
                                         finish_reason=f.finish_reason,
                                         alignment=choice_alignment(f)) for f in finals]
        return self._with_token_ids(
            CompletionResponse(choices=text_choices, **common).model_dump(), finals)

    def _prompt_ids(self, index: int) -> list[int]:
        return self.p.decodes[index // self.p.decode.n].prompt_ids

    def _with_token_ids(self, data: dict[str, Any], finals: list[ChoiceFinal]
                        ) -> dict[str, Any]:
        """vLLM's `return_token_ids`: the prompt's ids (per choice on completions, whose
        prompts may differ) and each choice's own; the keys are left out otherwise."""
        if not self.p.return_token_ids:
            data.pop("prompt_token_ids", None)
            for choice in data["choices"]:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
            return data
        ids = {f.index: list(f.token_ids) for f in finals}
        if self.p.kind == "chat":
            data["prompt_token_ids"] = list(self.p.decode.prompt_ids)
        for choice in data["choices"]:
            choice["token_ids"] = ids[choice["index"]]
            if self.p.kind != "chat":
                choice["prompt_token_ids"] = list(self._prompt_ids(choice["index"]))
        return data

    # -- stream chunks

    def _chunk(self, choices: list[Any]) -> Chunk:
        if self.p.kind == "chat":
            return ChatCompletionChunk(id=self.p.request_id, created=self.p.created,
                                       model=self.p.model, choices=choices)
        return CompletionChunk(id=self.p.request_id, created=self.p.created, model=self.p.model,
                               choices=choices)

    def opening(self, index: int, prompt: list | None = None) -> Chunk | None:
        """Chat: the assistant role, as vLLM sends first; completions: the echoed prompt,
        with its own log-probs (`prompt`) when they were asked for."""
        if self.p.kind == "chat":
            chunk = self._chunk([ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content=""))])
            if self.p.return_token_ids and index == 0:  # once, on the first chunk
                chunk.prompt_token_ids = list(self.p.decode.prompt_ids)
            return chunk
        if self.p.echo(index):
            logprobs = self.completion_logprobs(index, [], prompt) if prompt is not None else None
            return self._chunk([CompletionStreamChoice(index=index, text=self.p.echo(index),
                                                       logprobs=logprobs, **self._ids(index))])
        return None

    def _ids(self, index: int, token_ids: list[int] | None = None) -> dict[str, Any]:
        """A stream choice's token-id fields: its tokens, and on a completions choice's
        first chunk its prompt's (chat sends those once, on the opening chunk)."""
        if not self.p.return_token_ids:
            return {}
        out: dict[str, Any] = {"token_ids": list(token_ids or ())}
        if self.p.kind != "chat" and index not in self.started:
            self.started.add(index)
            out["prompt_token_ids"] = list(self._prompt_ids(index))
        return out

    def delta(self, index: int, text: str, logprobs: list[Any],
              token_ids: list[int] | None = None) -> Chunk:
        if self.p.kind == "chat":
            return self._chunk([ChatStreamChoice(index=index, delta=DeltaMessage(content=text),
                                                 logprobs=self.chat_logprobs(logprobs),
                                                 **self._ids(index, token_ids))])
        return self._chunk([CompletionStreamChoice(
            index=index, text=text, logprobs=self.completion_logprobs(index, logprobs),
            **self._ids(index, token_ids))])

    def finish(self, final: ChoiceFinal) -> Chunk:
        # a choice whose text was held (tools) sends its token ids here, all at once
        held = list(final.token_ids) if self.holds_text else None
        if self.p.kind == "chat":
            return self._chunk([ChatStreamChoice(index=final.index, delta=DeltaMessage(),
                                                 finish_reason=self.finish_reason(final),
                                                 alignment=choice_alignment(final),
                                                 **self._ids(final.index, held))])
        return self._chunk([CompletionStreamChoice(index=final.index, text="",
                                                   finish_reason=final.finish_reason,
                                                   alignment=choice_alignment(final),
                                                   **self._ids(final.index, held))])

    def closing(self, use: UsageInfo | None, summary: RequestSummary) -> Chunk:
        """The usage chunk (empty choices), carrying the request's alignment report."""
        chunk = self._chunk([])
        if use is not None:
            chunk.usage = use
        chunk.alignment = report(summary)
        return chunk

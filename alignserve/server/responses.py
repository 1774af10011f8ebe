"""OpenAI's Responses API (POST /v1/responses), served over the chat path.

A Responses request becomes a chat request (`to_chat_request`): `instructions` a system message,
the input items messages (a `function_call` item an assistant tool call, its
`function_call_output` a tool message), `text.format` the response_format, flat function tools
chat's tools, `max_output_tokens` max_completion_tokens. The chat answer is then reshaped
(`ResponsesWire`): the message's text an `output_text` item, each tool call a `function_call`
item, usage as input/output tokens, and the reward with the search report in `alignment`. A
stream is OpenAI's typed events (response.created ... response.completed), each with its
`sequence_number`, translated from the chat chunks as they come. Errors the chat path raises
name the Responses field (`max_output_tokens`, `text.format`, `input`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from pydantic import ValidationError

from alignserve.server.errors import APIError, validation_error
from alignserve.server.protocol import (
    ChatCompletionRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponsesRequest,
)

# chat request field -> the Responses field it came from (for error params and messages)
_FIELDS = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format.json_schema": "text.format", "response_format": "text.format",
           "messages": "input", "logprobs": "include"}


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers `req` (validated as any chat request is)."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [] if isinstance(req.input, str) else req.input
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            # parallel calls (and the text before them) are one assistant turn in chat
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text()})
        else:
            messages.append({"role": item.role, "content": item.text()})
    chat: dict[str, Any] = {
        "model": req.model, "messages": messages, "stream": req.stream,
        "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "seed": req.seed, "parallel_tool_calls": req.parallel_tool_calls,
    }
    if req.stream:  # the usage chunk carries the search report the last event needs
        chat["stream_options"] = {"include_usage": True}
    if req.wants_logprobs():
        chat["logprobs"] = True
        chat["top_logprobs"] = req.top_logprobs or 0
    if req.alignment is not None:
        chat["alignment"] = req.alignment.model_dump(exclude_unset=True)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None:
        chat["response_format"] = {"type": fmt.type} if fmt.type != "json_schema" else {
            "type": "json_schema", "json_schema": fmt.model_dump(
                include={"name", "description", "schema_", "strict"}, by_alias=True,
                exclude_none=True)}
    if req.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(
            exclude={"type"}, exclude_none=True)} for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        chat["tool_choice"] = choice if isinstance(choice, str) else {
            "type": "function", "function": {"name": choice.name}}
    body = {k: v for k, v in chat.items() if v is not None}
    try:
        return ChatCompletionRequest.model_validate_json(json.dumps(body))
    except ValidationError as e:  # what only the chat request checks (a message's shape)
        raise responses_error(validation_error(list(e.errors()))) from None


def responses_error(err: APIError) -> APIError:
    """A chat-path error, naming the Responses request's fields instead of chat's."""
    param, message = err.param, err.message
    for chat, ours in _FIELDS.items():
        # field names as messages print them (bare or quoted); `messages` only quoted, it
        # is also a word
        pattern = r"`messages`" if chat == "messages" else rf"(?<![\w.]){re.escape(chat)}\b"
        message = re.sub(pattern, f"`{ours}`" if chat == "messages" else ours, message)
    if param is not None:
        for chat, ours in _FIELDS.items():
            if param == chat or param.startswith((chat + ".", chat + "[")):
                # a message index counts chat's messages (instructions first): say `input`
                rest = "" if chat == "messages" else param[len(chat):]
                param = ours + rest
                break
    return APIError(message, param=param, status=err.status, headers=err.headers)


def _usage(chat_usage: dict[str, int] | None) -> dict[str, Any] | None:
    if chat_usage is None:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


def _logprobs(chat_logprobs: dict[str, Any] | None) -> list[dict[str, Any]]:
    return list((chat_logprobs or {}).get("content") or [])


class ResponsesWire:
    """One Responses request's answer, shaped from its chat answer (whole or streamed)."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.logprobs = req.wants_logprobs()

    # -- the response object

    def response(self, status: str, output: list[dict[str, Any]],
                 usage: dict[str, Any] | None = None, alignment: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format else None
        choice = req.tool_choice
        return {
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "model": self.model, "output": output, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt else {"type": "text"}},
            "tool_choice": (choice if isinstance(choice, str) else choice.model_dump())
            if choice is not None else "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or ()],
            "top_logprobs": req.top_logprobs, "truncation": "disabled", "user": req.user,
            "usage": usage, "alignment": alignment,
        }

    def _message(self, item_id: str, text: str, logprobs: list[dict[str, Any]],
                 status: str) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = logprobs
        return {"type": "message", "id": item_id, "status": status, "role": "assistant",
                "content": [part]}

    @staticmethod
    def _call(item_id: str, call_id: str, name: str, arguments: str,
              status: str = "completed") -> dict[str, Any]:
        return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    @staticmethod
    def _status(finish_reason: str | None) -> str:
        return "incomplete" if finish_reason == "length" else "completed"

    def body(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The whole Response for a whole chat completion."""
        choice = chat["choices"][0]
        message, status = choice["message"], self._status(choice["finish_reason"])
        output: list[dict[str, Any]] = []
        if message.get("content") or not message.get("tool_calls"):
            output.append(self._message(_new_id("msg"), message.get("content") or "",
                                        _logprobs(choice.get("logprobs")), status))
        for call in message.get("tool_calls") or ():
            output.append(self._call(_new_id("fc"), call["id"], call["function"]["name"],
                                     call["function"]["arguments"]))
        alignment = {**choice["alignment"], **chat["alignment"]}
        return self.response(status, output, _usage(chat["usage"]), alignment)

    # -- the stream

    async def events(self, chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[str]:
        """OpenAI's typed events for a stream of chat chunks (or a chat error body); closing
        this closes `chunks`, which cancels the run."""
        stream = _EventStream(self)
        yield stream.event("response.created", response=self.response("in_progress", []))
        yield stream.event("response.in_progress", response=self.response("in_progress", []))
        async with aclosing(chunks):
            async for chunk in chunks:
                if "error" in chunk:
                    for event in stream.fail(chunk["error"]):
                        yield event
                    return
                for event in stream.take(chunk):
                    yield event
        for event in stream.finish():
            yield event


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _EventStream:
    """The open output item and what has been said so far, turned into events."""

    def __init__(self, wire: ResponsesWire) -> None:
        self.wire = wire
        self.sequence = 0
        self.output: list[dict[str, Any]] = []  # items done
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.alignment: dict[str, Any] = {}

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {payload}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def take(self, chunk: dict[str, Any]) -> list[str]:
        out: list[str] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                out += self._text(delta["content"], _logprobs(choice.get("logprobs")))
            for piece in delta.get("tool_calls") or ():
                out += self._call_piece(piece)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.alignment.update(choice.get("alignment") or {})
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        if chunk.get("alignment"):
            self.alignment.update(chunk["alignment"])
        return out

    def _text(self, text: str, logprobs: list[dict[str, Any]]) -> list[str]:
        out: list[str] = []
        if self.open is None or self.open["type"] != "message":
            out += self._close() + self._open_message()
        self.open["text"] += text
        self.open["logprobs"] += logprobs
        out.append(self.event("response.output_text.delta", **self._where(), content_index=0,
                              delta=text, logprobs=logprobs))
        return out

    def _open_message(self) -> list[str]:
        """A new message item, open, with its one (empty) output_text part."""
        self.open = {"type": "message", "id": _new_id("msg"), "text": "", "logprobs": []}
        item = self.wire._message(self.open["id"], "", [], "in_progress")
        return [self.event("response.output_item.added", output_index=len(self.output),
                           item=item),
                self.event("response.content_part.added", **self._where(), content_index=0,
                           part=item["content"][0])]

    def _call_piece(self, piece: dict[str, Any]) -> list[str]:
        out: list[str] = []
        function = piece.get("function") or {}
        if piece.get("id"):  # a call's first piece: its id and name
            out += self._close()
            self.open = {"type": "function_call", "id": _new_id("fc"), "call_id": piece["id"],
                         "name": function.get("name", ""), "arguments": ""}
            item = self.wire._call(self.open["id"], piece["id"], self.open["name"], "",
                                   "in_progress")
            out.append(self.event("response.output_item.added", output_index=len(self.output),
                                  item=item))
        if function.get("arguments") and self.open is not None:
            self.open["arguments"] += function["arguments"]
            out.append(self.event("response.function_call_arguments.delta", **self._where(),
                                  delta=function["arguments"]))
        return out

    def _close(self) -> list[str]:
        """Finish the open item: its done events, then it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": len(self.output)}
        # a call arrives whole (a tools answer is held until it ends): it is complete
        done = self._item(item, self.wire._status(self.finish_reason)
                          if item["type"] == "message" else "completed")
        if item["type"] == "message":
            out = [self.event("response.output_text.done", **where, content_index=0,
                              text=item["text"], logprobs=item["logprobs"]),
                   self.event("response.content_part.done", **where, content_index=0,
                              part=done["content"][0])]
        else:
            out = [self.event("response.function_call_arguments.done", **where,
                              name=item["name"], arguments=item["arguments"])]
        out.append(self.event("response.output_item.done", output_index=len(self.output),
                              item=done))
        self.output.append(done)
        return out

    def _item(self, item: dict[str, Any], status: str) -> dict[str, Any]:
        """The output item an open one stands for."""
        if item["type"] == "message":
            return self.wire._message(item["id"], item["text"], item["logprobs"], status)
        return self.wire._call(item["id"], item["call_id"], item["name"], item["arguments"],
                               status)

    def finish(self) -> list[str]:
        # nothing said: an empty answer is a message
        opening = self._open_message() if not self.output and self.open is None else []
        out = opening + self._close()
        status = self.wire._status(self.finish_reason)
        final = self.wire.response(status, self.output, self.usage, self.alignment or None)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + [self.event(kind, response=final)]

    def fail(self, error: dict[str, Any]) -> list[str]:
        """An error after the stream began: OpenAI's `error` event, then response.failed."""
        code = str(error.get("code")) if error.get("code") is not None else None
        out = [self.event("error", code=code, message=error.get("message", ""),
                          param=error.get("param"))]
        # what was said so far, the item cut short by the error included
        said = self.output + ([self._item(self.open, "incomplete")] if self.open else [])
        failed = self.wire.response("failed", said, self.usage, None,
                                    {"code": code, "message": error.get("message", "")})
        return out + [self.event("response.failed", response=failed)]

"""Compile GrammarSpecs against one tokenizer with xgrammar, bounded in size and time, cached.

One `TokenizerGrammars` per served tokenizer. Compilation runs on a small thread pool of its
own (xgrammar releases the GIL while it compiles), so `compile_async` never blocks the event
loop and a compile past `grammar_compile_timeout` is answered with a GrammarLimitError while the
thread finishes in the background; the pool's size bounds how many such compiles can pile up.
Compiled grammars sit in an LRU cache keyed by (tokenizer fingerprint, spec.key); a compile in
flight is in the cache too, so identical concurrent requests share it, and a client that retries
after a timeout waits on the same compile instead of starting another. Failed compiles leave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from alignserve.engine.grammar.errors import GrammarError, GrammarLimitError
from alignserve.engine.grammar.matcher import GrammarState
from alignserve.engine.grammar.schema_check import check_schema
from alignserve.engine.grammar.spec import GrammarSpec


@dataclass(frozen=True)
class GrammarLimits:
    """The bounds the server exposes as flags (--max-grammar-bytes, --grammar-compile-timeout,
    --grammar-cache-entries)."""

    max_grammar_bytes: int = 65536  # every schema of a spec together, as compact JSON
    grammar_compile_timeout: float = 10.0  # seconds
    grammar_cache_entries: int = 256
    compile_threads: int = 2


@dataclass(frozen=True)
class CompiledSpec:
    """A spec compiled for one tokenizer; `new_state` starts a sequence's matcher."""

    spec: GrammarSpec
    grammar: xgr.CompiledGrammar

    def new_state(self) -> GrammarState:
        return GrammarState(xgr.GrammarMatcher(self.grammar))


def tokenizer_fingerprint(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> str:
    """What makes two tokenizers compile a grammar alike: the vocabulary and the stop tokens."""
    h = hashlib.sha256(f"{vocab_size}|{sorted(stop_token_ids)}|".encode())
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{index}\x00{token}\x01".encode())
    return h.hexdigest()[:16]


class GrammarCache:
    """An LRU of compiles (futures, done or in flight), bounded by entry count; it may be shared
    by several TokenizerGrammars since keys carry the tokenizer's fingerprint."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], concurrent.futures.Future] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_start(self, key: tuple[str, str], start) -> concurrent.futures.Future:
        with self._lock:
            future = self._entries.get(key)
            if future is not None and _failed(future):  # its drop callback may not have run yet
                future = None
            if future is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = start()
            self._entries[key] = future
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        future.add_done_callback(lambda f: self._drop_failed(key, f))
        return future

    def _drop_failed(self, key: tuple[str, str], future: concurrent.futures.Future) -> None:
        if _failed(future):
            with self._lock:
                if self._entries.get(key) is future:
                    del self._entries[key]


def _failed(future: concurrent.futures.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: "


class TokenizerGrammars:
    """Grammars for one tokenizer (and model vocabulary, which may be wider than it)."""

    def __init__(self, tokenizer: Any, vocab_size: int, limits: GrammarLimits | None = None,
                 stop_token_ids: list[int] | None = None, cache: GrammarCache | None = None):
        self.limits = limits or GrammarLimits()
        self.vocab_size = vocab_size
        stops = stop_token_ids or [tokenizer.eos_token_id]
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stops)
        self.fingerprint = tokenizer_fingerprint(tokenizer, vocab_size, stops)
        # xgrammar's own cache is unbounded by default: ours (bounded) replaces it.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=self.limits.compile_threads,
                                             cache_enabled=False)
        self.cache = (cache if cache is not None
                      else GrammarCache(self.limits.grammar_cache_entries))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.limits.compile_threads, thread_name_prefix="alignserve-grammar")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # checks ------------------------------------------------------------------------------
    def check(self, spec: GrammarSpec) -> None:
        """The limits and the schema checks, with paths from the spec's root ("schema...",
        "tools[i].parameters...")."""
        size = spec.schema_bytes
        if size > self.limits.max_grammar_bytes:
            raise GrammarLimitError(
                f"the schemas are {size} bytes as compact JSON; at most "
                f"{self.limits.max_grammar_bytes} are allowed", "max_grammar_bytes")
        if spec.schema is not None:
            check_schema(json.loads(spec.schema), ("schema",))
        for i, tool in enumerate(spec.tools):
            check_schema(tool.parameters_schema, ("tools", i, "parameters"))

    # compiling ---------------------------------------------------------------------------
    def _start(self, spec: GrammarSpec) -> concurrent.futures.Future:
        self.check(spec)
        return self.cache.get_or_start((self.fingerprint, spec.key),
                                       lambda: self._pool.submit(self._compile_now, spec))

    def compile(self, spec: GrammarSpec) -> CompiledSpec:
        """Blocking; for worker threads and tests (the server uses compile_async)."""
        future = self._start(spec)
        try:
            return future.result(timeout=self.limits.grammar_compile_timeout)
        except concurrent.futures.TimeoutError:
            raise self._timeout() from None

    async def compile_async(self, spec: GrammarSpec) -> CompiledSpec:
        future = asyncio.wrap_future(self._start(spec))
        try:
            # shielded: a cancelled or timed-out waiter leaves the shared compile running
            return await asyncio.wait_for(asyncio.shield(future),
                                          self.limits.grammar_compile_timeout)
        except TimeoutError:
            raise self._timeout() from None

    def _timeout(self) -> GrammarLimitError:
        return GrammarLimitError(
            f"compiling the grammar took longer than {self.limits.grammar_compile_timeout} s",
            "grammar_compile_timeout")

    def _compile_now(self, spec: GrammarSpec) -> CompiledSpec:
        try:
            if spec.kind == "tools":
                grammar = self._compiler.compile_structural_tag(json.dumps(spec.structural_tag()))
            else:
                grammar = self._compiler.compile_json_schema(
                    json.dumps(spec.response_schema()), any_whitespace=False,
                    strict_mode=spec.strict is not False)
        except Exception as exc:  # noqa: BLE001  (xgrammar raises RuntimeError/ValueError)
            raise self._explain(spec, exc) from None
        return CompiledSpec(spec, grammar)

    def _explain(self, spec: GrammarSpec, exc: Exception) -> GrammarError:
        """xgrammar's message names no place; find a `pattern` it cannot parse, else say it
        for the whole spec."""
        schemas = [(json.loads(spec.schema), ("schema",))] if spec.schema else []
        schemas += [(t.parameters_schema, ("tools", i, "parameters"))
                    for i, t in enumerate(spec.tools)]
        for schema, base in schemas:
            for path, pattern in _patterns(schema, base):
                try:
                    xgr.Grammar.from_regex(pattern)
                except Exception as bad:  # noqa: BLE001
                    return GrammarError(f"the pattern cannot be compiled: {_clean(bad)}", path)
        return GrammarError(f"the schema cannot be compiled: {_clean(exc)}")


def _clean(exc: Exception) -> str:
    return _LOG_PREFIX.sub("", str(exc).strip())


def _patterns(node: Any, path: tuple) -> list[tuple[tuple, str]]:
    """Every `pattern` string in a schema, with its path (data under enum/const included: a
    false hit there only costs a from_regex call)."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                out.append((path + (key,), value))
            else:
                out.extend(_patterns(value, path + (key,)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(_patterns(value, path + (i,)))
    return out

"""Compile a prepared request's GrammarSpec before it decodes, and hand it to the engine.

One `TokenizerGrammars` (engine/grammar) per served engine, built on the first request that
asks for structured output (xgrammar reads the whole vocabulary: about a second, off the event
loop). Compilation is awaited here, in the request, so a slow or failing compile is that
request's 400 and never stalls the engine loop; errors name the JSON path on the wire and
limits name their flag (server/structured.py `api_error`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from alignserve.engine.grammar import GrammarError, GrammarLimits, TokenizerGrammars
from alignserve.server.prepare import Prepared
from alignserve.server.settings import ServerSettings
from alignserve.server.structured import LEGACY, WIRE, api_error


class ServerGrammars:
    def __init__(self, engine: Any, settings: ServerSettings) -> None:
        self.engine = engine
        self.limits = GrammarLimits(max_grammar_bytes=settings.max_grammar_bytes,
                                    grammar_compile_timeout=settings.grammar_compile_timeout,
                                    grammar_cache_entries=settings.grammar_cache_entries)
        self._grammars: TokenizerGrammars | None = None
        self._building: asyncio.Lock | None = None

    async def _for_engine(self) -> TokenizerGrammars:
        if self._grammars is None:
            self._building = self._building or asyncio.Lock()
            async with self._building:
                if self._grammars is None:
                    stops = sorted(getattr(self.engine, "eos_token_ids", None) or ()) or None
                    self._grammars = await asyncio.to_thread(
                        TokenizerGrammars, self.engine.tokenizer, self.engine.vocab_size,
                        self.limits, stops)
        return self._grammars

    async def attach(self, prepared: Prepared) -> None:
        """Compile prepared.grammar (if any) into every decode's SamplingParams.grammar."""
        if prepared.grammar is None:
            return
        grammars = await self._for_engine()
        try:
            compiled = await grammars.compile_async(prepared.grammar)
        except GrammarError as err:
            raise api_error(err, LEGACY if prepared.legacy_functions else WIRE) from None
        prepared.decodes = [dataclasses.replace(d, sampling=dataclasses.replace(
            d.sampling, grammar=compiled)) for d in prepared.decodes]
        prepared.decode = prepared.decodes[0]

    def close(self) -> None:
        if self._grammars is not None:
            self._grammars.close()

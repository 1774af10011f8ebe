"""Backpressure: how many requests run, how many wait, and how much KV memory they may hold.

Every request that passed validation asks for a `Ticket` before any work starts. A ticket is
granted at once when fewer than `max_running_requests` run, nobody waits ahead of it and its
KV reservation fits in what the running requests left free; otherwise it waits its turn in a
FIFO queue of at most `max_waiting_requests`. Past that bound `enter` raises `Overloaded` and
the client gets 429 with Retry-After: nothing is ever queued without bound.

KV memory (native engine): a request reserves a conservative estimate of the KV slots it can
hold at its peak (`kv_slots_needed`: what its strategy declares, `Strategy.kv_slots`; admission
knows no strategy by name). A request whose estimate exceeds the whole cache can never fit and
gets a 400 before it is queued (prepare.py); one that does not fit next to the running ones
waits for them to finish. The sum of reservations never exceeds the cache, so a request
admitted here is never cut short by another one's memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from alignserve.decoding.base import STRATEGIES, DecodeRequest

# Slots a request holds beyond its estimate: the engine admits a prefill only with its prompt
# plus this much free (NativeEngine._admit_prefills).
PREFILL_SLACK = 64


class Overloaded(Exception):
    """The waiting queue is full."""


def kv_slots_needed(decode: DecodeRequest, page: int, prompt_len: int | None = None,
                    max_tokens: int | None = None) -> int:
    """Worst-case KV slots one request holds at once on the native engine: what its strategy
    declares (`Strategy.kv_slots`, decoding.kv), plus the prefill's slack."""
    prompt = len(decode.prompt_ids) if prompt_len is None else prompt_len
    tokens = decode.sampling.max_tokens if max_tokens is None else max_tokens
    return STRATEGIES[decode.strategy].kv_slots(decode, prompt, tokens, page) + PREFILL_SLACK


def engine_kv(engine: Any) -> tuple[int, int] | None:
    """(total slots, page size) of a native engine's KV cache; None for other engines."""
    kv = getattr(engine, "kv", None)
    total = getattr(kv, "num_slots", None)
    if not isinstance(total, int) or total <= 0:
        return None
    from alignserve.engine.native.kv_cache import PAGE

    return total, PAGE


class Ticket:
    """One request's place: waiting, then running (holding its KV reservation), then done."""

    def __init__(self, admission: Admission, kv_slots: int) -> None:
        self.admission = admission
        self.kv_slots = kv_slots
        self.granted = asyncio.get_running_loop().create_future()
        self.state = "waiting"  # waiting | running | done
        self.waited = 0.0

    @property
    def running(self) -> bool:
        return self.state == "running"

    async def acquire(self) -> None:
        """Wait until granted; cancelling the wait gives the place up."""
        if self.state == "running":
            return
        if self.state == "done":
            raise asyncio.CancelledError()
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.shield(self.granted)
        except asyncio.CancelledError:
            self.release()
            raise
        finally:
            self.waited = loop.time() - start

    def release(self) -> None:
        """Idempotent: frees the running slot and the reservation, or leaves the queue."""
        self.admission._release(self)


class Admission:
    def __init__(self, max_running: int, max_waiting: int, kv_total: int | None = None) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.kv_total = kv_total
        self.running = 0
        self.kv_reserved = 0
        self.queue: deque[Ticket] = deque()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def _fits(self, ticket: Ticket) -> bool:
        if self.running >= self.max_running:
            return False
        return self.kv_total is None or self.kv_reserved + ticket.kv_slots <= self.kv_total

    def _grant(self, ticket: Ticket) -> None:
        ticket.state = "running"
        self.running += 1
        self.kv_reserved += ticket.kv_slots
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def enter(self, kv_slots: int = 0) -> Ticket:
        """A ticket, granted at once when there is room; `Overloaded` when the queue is full."""
        ticket = Ticket(self, kv_slots)
        if not self.queue and self._fits(ticket):
            self._grant(ticket)
        elif len(self.queue) < self.max_waiting:
            self.queue.append(ticket)
        else:
            ticket.state = "done"
            raise Overloaded()
        return ticket

    def _release(self, ticket: Ticket) -> None:
        if ticket.state == "running":
            self.running -= 1
            self.kv_reserved -= ticket.kv_slots
        elif ticket.state == "waiting":
            try:
                self.queue.remove(ticket)
            except ValueError:
                pass
            if not ticket.granted.done():
                ticket.granted.cancel()
        ticket.state = "done"
        self._dispatch()

    def _dispatch(self) -> None:
        """First come, first served: the head of the queue goes once it fits."""
        while self.queue and self._fits(self.queue[0]):
            self._grant(self.queue.popleft())

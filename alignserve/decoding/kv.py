"""What a strategy declares about its KV memory: the most cache slots one request can hold at
once on the native engine (server/admission.py reserves it before the request runs).

Each strategy's `Strategy.kv_slots(request, prompt, tokens, page)` answers for its own
search; `prompt` and `tokens` are the prompt length and max_tokens to assume (admission may ask
about a smaller max_tokens to find one that fits), `page` the engine's page size. Sequences own
whole pages, and every segment (a prompt, a forked branch, a search step's committed tokens)
starts on a page of its own, so each is rounded up, plus one page where a shared segment's last
page is partly filled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

KvSlots = Callable[[Any, int, int, int], int]  # (DecodeRequest, prompt, tokens, page) -> slots


def pages(tokens: int, page: int) -> int:
    return -(-max(tokens, 0) // page)


def branch(tokens: int, page: int) -> int:
    """Slots of one segment of `tokens` tokens: its pages, plus a partly filled shared one."""
    return (pages(tokens, page) + 1) * page


def branching(decode: Any, prompt: int, tokens: int, page: int) -> int:
    """One prompt and `width` branches of `tokens` each, all alive to the end: plain sampling,
    best-of-n, anything whose candidates only ever shrink in number. Width is the larger of n
    and the request's `candidates`, times its `beam` where it has one."""
    p = decode.params
    width = max(decode.n, int(getattr(p, "candidates", 0) or 0))
    width *= max(1, int(getattr(p, "beam", 1) or 1))
    return branch(prompt, page) + width * branch(tokens, page)

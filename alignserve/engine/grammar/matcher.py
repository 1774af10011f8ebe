"""One grammar matcher per sequence, and the token masks it produces.

A `GrammarState` follows one sequence's output tokens: it is forked with the sequence (each
branch of best-of-N, DeAL or VAS gets its own), advanced with the tokens the sequence commits,
rolled back with it (`truncate`, DeAL's lookahead), and asked for the set of tokens allowed next
as a packed bitmask (int32 words, bit j of word w = token 32*w + j allowed). `sync` brings it
to a sequence's output in one call, so an engine only needs to call it before each step.

Masks are applied by `apply_bitmask`: xgrammar's kernels (C++ on CPU, Triton on CUDA) write
-inf into disallowed logits in place; `apply_bitmask_reference` is the plain PyTorch version
the tests hold them to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr

from alignserve.engine.grammar.errors import GrammarViolation


class GrammarState:
    def __init__(self, matcher: xgr.GrammarMatcher, tokens: list[int] | None = None) -> None:
        self._matcher = matcher
        self.tokens: list[int] = tokens or []  # accepted so far (the sequence's output)
        # the last sync met a token the grammar rejects: the output has left the grammar and
        # the engine ends the sequence (finish_reason "abort") instead of raising
        self.broken = False

    # advancing ---------------------------------------------------------------------------
    def accept(self, token_id: int) -> None:
        if not self.try_accept(token_id):
            raise GrammarViolation(f"token {token_id} is not allowed here by the grammar "
                                   f"(after {len(self.tokens)} tokens)")

    def try_accept(self, token_id: int) -> bool:
        """Accept the token if the grammar allows it; False (nothing changes) if not. Engines
        call this one: a rejected token must never raise inside an engine step."""
        if not self._matcher.accept_token(int(token_id)):
            return False
        self.tokens.append(int(token_id))
        return True

    def rollback(self, n: int) -> None:
        """Forget the last n accepted tokens."""
        if n:
            if n > len(self.tokens):
                raise ValueError(f"cannot roll back {n} of {len(self.tokens)} tokens")
            self._matcher.rollback(n)
            del self.tokens[len(self.tokens) - n:]

    def truncate(self, length: int) -> None:
        """Keep the first `length` output tokens (the engine's `truncate`, counted in output
        tokens)."""
        self.rollback(max(len(self.tokens) - length, 0))

    def sync(self, output_ids: Sequence[int]) -> bool:
        """Match the sequence's output: roll back what differs, accept what is new. False when
        the output holds a token the grammar rejects (the state then stops before it)."""
        common = 0
        for mine, theirs in zip(self.tokens, output_ids):
            if mine != theirs:
                break
            common += 1
        self.truncate(common)
        self.broken = not all(self.try_accept(token) for token in output_ids[common:])
        return not self.broken

    def fits(self, output_ids: Sequence[int]) -> bool:
        """Whether the state follows `output_ids` exactly (a sync that found no violation)."""
        return len(self.tokens) == len(output_ids) and self.tokens == list(output_ids)

    def fork(self, n: int = 1) -> list[GrammarState]:
        """n independent copies in this state (xgrammar deep-copies the parse state)."""
        return [GrammarState(self._matcher.fork(), list(self.tokens)) for _ in range(n)]

    # asking --------------------------------------------------------------------------------
    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the next-token mask into bitmask[row] (CPU int32). False: every token is
        allowed (the row need not be applied)."""
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return self._matcher.is_terminated()

    @property
    def completed(self) -> bool:
        """The output so far is a whole valid string (only a stop token may follow)."""
        return self._matcher.is_completed()

    def jump_forward(self) -> str:
        """Text the grammar forces next, whatever the model says (empty when it has a choice)."""
        return self._matcher.find_jump_forward_string()


def allowed_argmax(logits: torch.Tensor, bitmask: torch.Tensor) -> int | None:
    """The highest-scoring token of one row that one bitmask row allows (None: none is), on
    finite scores first: the fallback when sampling picked a token the grammar rejects (a
    steering term left only -inf or NaN on the allowed tokens)."""
    row = apply_bitmask_reference(logits.detach().float().cpu().view(1, -1),
                                  bitmask.view(1, -1))[0]
    allowed = apply_bitmask_reference(torch.zeros_like(row).view(1, -1), bitmask.view(1, -1))[0]
    ok = torch.isfinite(allowed)
    if not bool(ok.any()):
        return None
    row = torch.where(ok & torch.isfinite(row), row, torch.full_like(row, -1e30))
    row = torch.where(ok, row, torch.full_like(row, float("-inf")))
    return int(torch.argmax(row))


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 bitmask of `rows` rows, every token allowed."""
    return xgr.allocate_token_bitmask(rows, vocab_size)


def fill_bitmasks(states: Sequence[GrammarState | None], bitmask: torch.Tensor) -> list[int]:
    """Fill one row per state (None: an unconstrained row, left alone); returns the rows that
    constrain something, i.e. the ones `apply_bitmask` must touch."""
    rows = []
    for i, state in enumerate(states):
        if state is not None and not state.terminated and state.fill(bitmask, i):
            rows.append(i)
    return rows


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: Sequence[int] | None = None) -> torch.Tensor:
    """Set the disallowed logits of `rows` (all rows: None) to -inf, in place; returns logits.
    The bitmask is copied to the logits' device first (from CPU, where matchers fill it)."""
    if rows is not None and not rows:
        return logits
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                    indices=None if rows is None else list(rows))
    return logits


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: Sequence[int] | None = None) -> torch.Tensor:
    """What apply_bitmask computes, in PyTorch: unpack the bits and mask (returns new logits)."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]: LSB first
    allowed = bits.flatten(-2)[..., :vocab].to(device=logits.device, dtype=torch.bool)
    out = logits.clone()
    idx = range(logits.shape[0]) if rows is None else rows
    for i in idx:
        out[i] = out[i].masked_fill(~allowed[i], float("-inf"))
    return out


def mask_logits(states: Sequence[GrammarState | None], logits: torch.Tensor,
                bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """One step's grammar pass over [rows, vocab] logits, row i following states[i]: fill the
    masks and apply them in place. `bitmask` may be passed to reuse an allocation."""
    if bitmask is None or bitmask.shape[0] < len(states):
        bitmask = new_bitmask(len(states), logits.shape[-1])
    rows = fill_bitmasks(states, bitmask)
    return apply_bitmask(logits, bitmask[: len(states)], rows)

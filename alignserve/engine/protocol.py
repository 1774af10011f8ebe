"""The engine protocol: what a decoding strategy may ask of an engine.

Strategies (alignserve.decoding) drive any engine through this surface only, so a new
strategy never touches engine code and both engines (native, vllm) serve every strategy.

The model of work is a tree of sequences. `prefill` computes a prompt once and returns a
sequence whose next-token logits are pending; `fork` branches a sequence into children that
share everything computed so far (no KV copy); `extend` feeds chosen tokens; `generate`
samples until a stop condition; `truncate` rolls a sequence back; `release` frees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from alignserve.engine.steering import Steering


@dataclass
class SamplingParams:
    """Per-request sampling controls, mirroring the OpenAI/vLLM fields."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: Sequence[str] = ()
    include_stop_str_in_output: bool = False  # a stop string hit ends the text with it
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be sampled
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # token id -> value added to its logit before sampling (OpenAI's logit_bias, -100..100);
    # the chosen tokens' logprobs stay the model's own, as vLLM reports them
    logit_bias: dict[int, float] = field(default_factory=dict)
    # k: the prompt's own tokens get log-probs too (plus the top k), as vLLM's `prompt_logprobs`;
    # engines read it at prefill/extend (`prompt_logprobs=`), not while generating
    prompt_logprobs: int | None = None
    # False: the caller reads each sequence's text only once it has finished (best_of_n ranks
    # finished candidates), so an engine may skip per-token detokenization and decode once at
    # the end; events then carry empty text deltas until the last. Ignored when `stop` is set
    # (stop strings are matched as the text grows). Either way a finished handle's text is whole.
    detokenize: bool = True
    # structured outputs: the compiled grammar every output token must follow (the server's
    # engine/grammar CompiledSpec: the GrammarSpec as data plus its compiled form), or None.
    # The native engine keeps one matcher per sequence and masks the logits last; an engine
    # that cannot honour it must refuse the request, never ignore it.
    grammar: Any = None

    @property
    def per_token_text(self) -> bool:
        """Whether an engine must detokenize as it goes: asked to, or stop strings to match."""
        return self.detokenize or bool(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5


@dataclass
class StepInputs:
    """What an observer may read besides the logits, row for row.

    hidden: the final (normalized) hidden state that produced each row's logits [B, hidden]
    (None where the engine does not expose it, e.g. vLLM);
    early_logits: logits of the model truncated to the sequence's `early_layer`, when the
    sequence asked for them at prefill.
    """

    hidden: torch.Tensor | None = None
    early_logits: torch.Tensor | None = None


# An observer sees the rows of one request in one step: their handles, the model's own
# next-token logits [B, V] (what is sampled from is the request's Steering, applied by the
# engine) and StepInputs. It runs where the engine computes, before sampling; what it returns
# is ignored: it watches (DeAL's capture of rollout distributions, value-model training data),
# it never steers. Steering is data: alignserve.engine.steering.
Observer = Callable[[list["SeqHandle"], torch.Tensor, StepInputs], Any]


@dataclass
class TokenTally:
    """Model tokens a request caused, by kind (prefill, decode, lookahead)."""

    prefill: int = 0
    decode: int = 0
    lookahead: int = 0

    def add(self, kind: str, n: int) -> None:
        setattr(self, kind, getattr(self, kind) + n)

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.lookahead


@dataclass
class SeqHandle:
    """One sequence as a strategy sees it. Engines keep their own state behind `key`."""

    key: Any
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    cumulative_logprob: float = 0.0
    text: str = ""  # detokenized output so far (stop strings removed once finished)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[dict] = field(default_factory=list)  # per output token when asked
    # per prompt token when prefill/extend was asked for them: the first is None (nothing
    # predicts it), then {"token_id", "logprob", "top": [(id, logprob)]}
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    user: Any = None  # free slot for the strategy

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def branch(self, key: Any) -> SeqHandle:
        """A fork's child handle: the same tokens, text and log-probs so far, its own lists
        (and no strategy `user` slot)."""
        return SeqHandle(key=key, prompt_len=self.prompt_len, token_ids=list(self.token_ids),
                         cumulative_logprob=self.cumulative_logprob, text=self.text,
                         logprobs=list(self.logprobs),
                         prompt_logprobs=list(self.prompt_logprobs))


@dataclass
class TokenEvent:
    """One committed token of one sequence."""

    seq: SeqHandle
    token_id: int
    logprob: float
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class EngineError(RuntimeError):
    """Raised for requests the engine cannot serve (e.g. out of KV memory)."""


class CapacityError(EngineError):
    """The request can never fit in the engine's KV budget."""


class RequestError(EngineError):
    """The engine refused the request's parameters (e.g. vLLM's validation): the client's to
    fix, answered 400."""


def check_prefill(prompt_ids: Sequence[int], early_layer: int | None, max_model_len: int,
                  num_layers: int | None) -> None:
    """What every engine refuses at prefill: an empty prompt, an early-exit layer outside
    [1, num_layers) (unchecked when num_layers is unknown), a prompt that fills the context."""
    if not prompt_ids:
        raise EngineError("empty prompt")
    if early_layer is not None and num_layers is not None and not 1 <= early_layer < num_layers:
        raise EngineError(f"early_layer must be in [1, {num_layers - 1}]")
    if len(prompt_ids) >= max_model_len:
        raise CapacityError(f"prompt of {len(prompt_ids)} tokens exceeds the context of "
                            f"{max_model_len}")


@runtime_checkable
class Engine(Protocol):
    tokenizer: Any
    model_name: str
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int

    async def prefill(self, prompt_ids: Sequence[int], tally: TokenTally | None = None,
                      early_layer: int | None = None,
                      prompt_logprobs: int | None = None) -> SeqHandle:
        """Compute the prompt once; its next-token logits become pending. With `early_layer`
        the sequence and its forks also keep the logits of the first `early_layer` layers.
        With `prompt_logprobs` (k) the handle's `prompt_logprobs` gets each prompt token's."""

    async def fork(self, seq: SeqHandle, n: int) -> list[SeqHandle]:
        """n children sharing all of `seq`'s KV and its pending logits; `seq` stays usable."""

    async def extend(
        self, seqs: list[SeqHandle], tokens: list[list[int]], tally: TokenTally | None = None,
        kind: str = "decode", prompt_logprobs: int | None = None,
    ) -> None:
        """Feed the given tokens (any number per sequence) and make new logits pending.
        With `prompt_logprobs` (k) each fed token's log-prob is appended to the handle's
        `prompt_logprobs` (a prompt continued in pieces: shared prefix, then its own rest)."""

    async def logits(self, seqs: list[SeqHandle]) -> torch.Tensor:
        """The pending next-token logits, float32 [len(seqs), vocab] on CPU."""

    def generate(
        self, seqs: list[SeqHandle], params: SamplingParams, steering: Steering | None = None,
        tally: TokenTally | None = None, kind: str = "decode", observer: Observer | None = None,
    ) -> AsyncIterator[list[TokenEvent]]:
        """Sample every sequence until it stops; yields the tokens committed in each step.
        `steering` (contrastive, value guidance) is applied with `params`' penalties, logit
        bias, min_tokens and grammar in the engine's logit pass; whatever it needs (an
        amateur's context, value models' Q) the engine computes itself. `observer`, if given,
        watches each step's logits (see Observer)."""

    async def truncate(self, seq: SeqHandle, length: int) -> None:
        """Roll `seq` back to its first `length` tokens (logits are no longer pending)."""

    async def release(self, seqs: list[SeqHandle]) -> None:
        """Free the sequences; their KV goes once no other sequence shares it."""

    def stats(self) -> EngineStats: ...

    async def close(self) -> None: ...


@dataclass
class EngineStats:
    """Counters read by the metrics collector at scrape time (monotonic unless noted)."""

    prefill_tokens: int = 0  # prompt tokens actually computed
    twin_tokens: int = 0  # decode tokens not computed: a twin row reused another's (native)
    model_tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "lookahead": 0})
    running_sequences: int = 0  # gauge
    waiting_requests: int = 0  # gauge
    kv_used_slots: int = 0  # gauge
    kv_total_slots: int = 0  # gauge
    steps: int = 0

"""From a validated wire request to a DecodeRequest: the checks pydantic cannot do alone.

These need the engine (tokenizer, context length), the strategy registry, the reward registry
or the server's limits. Every failure is an APIError naming the offending field.

Limits: a strategy's own keys (top_k, lookahead, beam, candidates) are first validated by its
pydantic params (their hard bounds), then held to the server's limits here: a value the client
set above a limit is a 400 naming the field and the flag; a strategy *default* above a limit is
lowered to it (so every strategy still runs with `strategy` alone). The KV check comes last: a
request whose worst case cannot fit in the whole KV cache is a 400, unless max_tokens was left
to the server, which then picks the most that fits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from alignserve.decoding.base import (
    STRATEGIES,
    DecodeRequest,
    Strategy,
    StrategyInputError,
    StrategyParams,
)
from alignserve.engine.grammar import GrammarSpec
from alignserve.engine.protocol import Engine
from alignserve.rewardmodels.protocol import RewardSpecError
from alignserve.server.admission import kv_slots_needed
from alignserve.server.errors import APIError, validation_error
from alignserve.server.protocol import (
    AlignmentRequest,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from alignserve.server.settings import ServerSettings
from alignserve.server.structured import (
    LEGACY,
    WIRE,
    ChosenFunction,
    grammar_spec_for,
    render_messages,
)

log = logging.getLogger("alignserve.server")

Kind = Literal["chat", "completion"]

# Structured outputs on the vllm engine: vLLM's own grammar (its structured outputs) starts at
# the first token a vLLM request generates, so it holds a strategy whose every branch decodes
# its whole answer in one request from the prompt (sample, best_of_n, vas, contrastive). The
# others continue partial answers in later requests (deal's commits, the segment searches'
# rounds), where vLLM would restart the grammar mid-answer: they answer 400 there. The native
# engine keeps a matcher per sequence (forked, extended and rolled back with it) and serves
# every strategy.
VLLM_GRAMMAR_STRATEGIES = ("sample", "best_of_n", "vas", "contrastive")

# alignment keys held to a server limit: key -> settings field (flag --max-...)
STRATEGY_LIMITS = {"candidates": "max_candidates", "top_k": "max_top_k",
                   "lookahead": "max_lookahead", "beam": "max_beam"}


def flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


@dataclass
class Prepared:
    """Everything the response side needs besides the decode events."""

    kind: Kind
    request_id: str
    created: int
    model: str
    strategy: Strategy
    decode: DecodeRequest  # the first prompt's (the only one but for a completions batch)
    include_usage: bool
    kv_slots: int = 0  # the KV slots admission reserves for it (0: not budgeted)
    decodes: list[DecodeRequest] = field(default_factory=list)  # one per prompt
    # completions with echo=true: each prompt's text, put before each of its choices
    echoes: list[str] = field(default_factory=list)
    # structured outputs: what the answer is held to (compiled into sampling.grammar by the
    # app before decoding), and the tools whose calls are parsed out of a finished answer
    grammar: GrammarSpec | None = None
    legacy_functions: bool = False  # answered as message.function_call (a `functions` request)
    return_token_ids: bool = False  # vLLM's: token ids beside the text

    @property
    def tool_names(self) -> list[str]:
        return [t.name for t in self.grammar.tools] if self.grammar is not None else []

    def __post_init__(self) -> None:
        if not self.decodes:
            self.decodes = [self.decode]

    @property
    def choices(self) -> int:
        """Choices in the response: n per prompt, prompt i's j-th numbered i*n + j."""
        return self.decode.n * len(self.decodes)

    def echo(self, index: int) -> str:
        """The prompt text choice `index` starts with (completions with echo), else ""."""
        return self.echoes[index // self.decode.n] if self.echoes else ""

    @property
    def prompt_logprobs(self) -> bool:
        return self.decode.sampling.prompt_logprobs is not None


class Preparer:
    def __init__(self, engine: Engine, settings: ServerSettings, rewards: Any,
                 served_model_name: str, resources: Any = None,
                 kv: tuple[int, int] | None = None) -> None:
        self.engine = engine
        self.kv = kv  # (total KV slots, page size) of a native engine: requests are budgeted
        self.resources = resources  # decoding.resources.DecodingResources (None: defaults)
        self.settings = settings
        self.rewards = rewards  # rewardmodels.compose.RewardRegistry
        self.served_model_name = served_model_name

    # -- entry points

    def chat(self, req: ChatCompletionRequest, request_id: str) -> Prepared:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("`top_logprobs` requires `logprobs: true`.", param="top_logprobs")
        spec, messages, prompt_text, prompt_ids = self.chat_prompt(req)
        prompt_text, prompt_ids = self._truncated(req, prompt_text, prompt_ids)
        prepared = self._finish("chat", req, prompt_text, list(prompt_ids), messages,
                                "messages", req.request_id or request_id)
        prepared.decode.continue_final = bool(req.continue_final_message)
        prepared.grammar = spec
        prepared.legacy_functions = req.legacy_functions
        return prepared

    def chat_prompt(self, req: ChatCompletionRequest
                    ) -> tuple[GrammarSpec | None, list[dict[str, str]], str, list[int]]:
        """What a chat request holds its answer to, and the prompt the model is fed: the
        rendered messages (tools listed in them), their text and token ids."""
        if req.continue_final_message:
            last = req.messages[-1]
            if req.add_generation_prompt:
                raise APIError("`continue_final_message` and `add_generation_prompt` cannot "
                               "both be true: the prompt either continues the final message "
                               "or opens a new turn.", param="continue_final_message")
            if last.role != "assistant" or last.tool_calls or last.function_call is not None:
                raise APIError("`continue_final_message` continues the final message, which "
                               "must be an assistant message with text (no calls).",
                               param="continue_final_message")
        tools, choice, parallel = req.tools, req.tool_choice, req.parallel_tool_calls
        if req.functions or isinstance(req.function_call, ChosenFunction):  # []: nothing asked
            tools, choice, parallel = self._legacy_tools(req)
        # `tools: []` with tool_choice none/auto (clients that always send both) asks for nothing
        choice = None if choice in ("none", "auto") and not tools else choice
        spec = grammar_spec_for(req.response_format, tools, choice, parallel,
                                LEGACY if req.legacy_functions else WIRE)
        self._check_grammar(req, spec)
        messages = render_messages(req.messages, tools, spec)
        try:
            prompt_text, prompt_ids = self.engine.encode_chat(
                messages, add_generation_prompt=req.opens_turn(),
                continue_final_message=bool(req.continue_final_message),
                template_kwargs=req.chat_template_kwargs)
        except Exception as e:  # noqa: BLE001  (templates raise anything; it is the input's fault)
            raise APIError(f"The chat template rejected the messages: {e}",
                           param="messages") from None
        return spec, messages, prompt_text, list(prompt_ids)

    @staticmethod
    def _legacy_tools(req: ChatCompletionRequest) -> tuple[Any, Any, bool]:
        """The deprecated `functions` / `function_call` as tools, one call at most (what a
        legacy client reads back is one `message.function_call`)."""
        if req.tools:
            raise APIError("Give `tools` or the deprecated `functions`, not both.",
                           param="functions")
        if req.tool_choice is not None:
            raise APIError("`tool_choice` goes with `tools`; with `functions` it is "
                           "`function_call`.", param="tool_choice")
        if not req.functions:
            raise APIError("`function_call` naming a function needs `functions`.",
                           param="function_call")
        tools, choice = req.legacy_tools()
        return tools, choice, False

    def _check_grammar(self, req: SamplingFields, spec: GrammarSpec | None) -> None:
        """What a grammar cannot be combined with, as 400s naming the field."""
        if spec is None:
            return
        legacy = getattr(req, "legacy_functions", False)  # chat requests only
        param = ("functions" if legacy else "tools") if spec.tools else "response_format"
        strategy = req.alignment_or_default().strategy
        if (getattr(self.engine, "kind", None) == "vllm" and strategy in STRATEGIES
                and strategy not in VLLM_GRAMMAR_STRATEGIES):
            raise APIError(f"`{param}` is not supported with strategy `{strategy}` on the vllm "
                           "engine: it continues partial answers in later vLLM requests, where "
                           "vLLM's structured outputs would restart the grammar; use "
                           f"{', '.join(VLLM_GRAMMAR_STRATEGIES)}, or the native engine.",
                           param=param)
        if req.allowed_token_ids:  # the grammar decides which tokens may come next
            raise APIError(f"`allowed_token_ids` cannot be combined with `{param}`.",
                           param="allowed_token_ids")
        if getattr(req, "continue_final_message", False):  # chat requests only
            raise APIError(f"`continue_final_message` cannot be combined with `{param}`: the "
                           "grammar would start over inside the answer already begun.",
                           param="continue_final_message")
        if req.ignore_eos:
            raise APIError(f"`ignore_eos` cannot be combined with `{param}`: the grammar ends "
                           "the answer with the end-of-sequence token.", param="ignore_eos")
        # a stop string or stop token id could cut a JSON answer or a tool call short, leaving
        # it invalid under finish_reason "stop": the grammar decides where the answer ends
        if req.stop_list():
            raise APIError(f"`stop` cannot be combined with `{param}`: the grammar decides "
                           "where the answer ends, and a stop string could cut it invalid.",
                           param="stop")
        eos = getattr(self.engine, "eos_token_ids", frozenset())
        if any(t not in eos for t in req.stop_token_ids or ()):
            raise APIError(f"`stop_token_ids` cannot be combined with `{param}`: the grammar "
                           "decides where the answer ends.", param="stop_token_ids")

    def completion(self, req: CompletionRequest, request_id: str) -> Prepared:
        self._check_common(req)
        self._check_best_of(req)
        if req.max_tokens == 0 and not req.echo:
            raise APIError("max_tokens 0 asks for nothing: it is allowed only with `echo: true` "
                           "(the prompt, with its log-probs when `logprobs` is set).",
                           param="max_tokens")
        spec = grammar_spec_for(req.response_format, None, None, None)
        self._check_grammar(req, spec)
        prompts = req.prompt_values()
        texts, ids = [], []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                texts.append(prompt)
                ids.append(list(self.engine.encode_prompt(prompt)))
                continue
            self.check_vocab(prompt, where)
            ids.append(list(prompt))
            texts.append(self.engine.tokenizer.decode(list(prompt)))
        for i, (text, prompt_ids) in enumerate(zip(texts, ids, strict=True)):
            texts[i], ids[i] = self._truncated(req, text, prompt_ids)
        prepared = self._finish("completion", req, texts[0], ids[0], None,
                                "prompt" if len(prompts) == 1 else "prompt[0]",
                                req.request_id or request_id)
        if len(prompts) > 1:
            first = prepared.decode
            for i, (text, prompt_ids) in enumerate(zip(texts[1:], ids[1:]), start=1):
                where = f"prompt[{i}]"
                max_tokens = self._max_tokens(req, "completion", len(prompt_ids), where)
                prepared.decodes.append(dataclasses.replace(
                    first, prompt_ids=prompt_ids, prompt_text=text,
                    sampling=dataclasses.replace(first.sampling, max_tokens=max_tokens)))
            prepared.kv_slots = sum(self._fit_kv(d, req) for d in prepared.decodes)
            if self.kv is not None and prepared.kv_slots > self.kv[0]:
                raise APIError(f"These {len(prompts)} prompts can need up to "
                               f"{prepared.kv_slots} KV cache slots at once, more than the "
                               f"{self.kv[0]} this server's whole KV cache holds "
                               "(--kv-cache-gib); send fewer prompts per request.",
                               param="prompt")
        prepared.echoes = texts if req.echo else []
        prepared.grammar = spec
        return prepared

    def _check_best_of(self, req: CompletionRequest) -> None:
        """`best_of` is best_of_n without rewards (protocol: alignment_or_default); its errors
        name `best_of`, not the alignment keys the client never sent."""
        best_of = req.best_of or 1
        if best_of == 1:
            return
        if req.alignment is not None:
            raise APIError("`best_of` above 1 cannot be combined with `alignment`: give the "
                           "strategy's own `candidates` instead.", param="best_of")
        if best_of < req.n:
            raise APIError(f"best_of ({best_of}) must be at least n ({req.n}): the best n of "
                           "best_of samples are returned.", param="best_of")
        most = self.settings.max_candidates
        if best_of > most:
            raise APIError(f"best_of is {best_of}; this server allows at most {most} "
                           f"({flag('max_candidates')}).", param="best_of")

    # -- shared steps

    def _truncated(self, req: SamplingFields, text: str, ids: list[int]
                   ) -> tuple[str, list[int]]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (and their text)."""
        keep = req.truncate_prompt_tokens
        if keep == -1:
            keep = self.engine.max_model_len
        if keep is None or len(ids) <= keep:
            return text, ids
        kept = list(ids[-keep:])
        return self.engine.tokenizer.decode(kept), kept

    def check_vocab(self, ids: Iterable[int], param: str, named: bool = False) -> None:
        """A token id outside the vocabulary is a 400 naming `param` (`named`: the message
        names the field too)."""
        vocab = self.engine.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            what = f"{param} names token id {bad[0]}," if named else f"Token id {bad[0]} is"
            raise APIError(f"{what} outside the vocabulary (0..{vocab - 1}).", param=param)

    def check_model(self, model: str | None) -> None:
        # "" names the served model too, as vLLM reads it (clients that leave it blank)
        if model and model != self.served_model_name:
            raise APIError(f"The model `{model}` does not exist.", param="model", status=404)

    def _check_common(self, req: SamplingFields) -> None:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            # OpenAI and vLLM answer 400: the options describe a stream that will not happen
            raise APIError("`stream_options` is only allowed with `stream: true`.",
                           param="stream_options")
        if req.n > self.settings.max_n:
            raise APIError(f"n is {req.n}; this server allows at most {self.settings.max_n} "
                           "(--max-n).", param="n")
        self.check_vocab(req.stop_token_ids or (), "stop_token_ids")
        self.check_vocab(req.bias(), "logit_bias", named=True)
        self.check_vocab(req.allowed_token_ids or (), "allowed_token_ids", named=True)
        if req.allowed_token_ids and req.alignment_or_default().strategy == "deal":
            # deal picks its actions among the model's top tokens, not through the sampler
            raise APIError("allowed_token_ids is not supported with strategy `deal`.",
                           param="allowed_token_ids")
        if req.bias() and req.alignment_or_default().strategy == "deal":
            # deal ranks its actions by the model's own log-probs; a bias there would be
            # applied to some tokens and not others
            raise APIError("logit_bias is not supported with strategy `deal`.",
                           param="logit_bias")
        ignored = req.ignored_fields() + [
            f"stream_options.{f}" for f in (req.stream_options.ignored_fields()
                                            if req.stream_options else [])]
        if ignored:
            log.debug("accepted and ignored: %s", ", ".join(ignored))

    def _strategy(self, spec: AlignmentRequest, n: int) -> tuple[Strategy, StrategyParams]:
        strategy = STRATEGIES.get(spec.strategy)
        if strategy is None:
            names = ", ".join(sorted(STRATEGIES))
            raise APIError(f"Unknown strategy `{spec.strategy}`; this server offers: {names}.",
                           param="alignment.strategy")
        try:
            params = strategy.params.model_validate(spec.strategy_params())
        except ValidationError as e:
            raise validation_error(list(e.errors()), prefix="alignment") from None
        params = self._limit_params(params)
        candidates = getattr(params, "candidates", None)
        if isinstance(candidates, int) and n > candidates:
            raise APIError(f"n ({n}) must not exceed alignment.candidates ({candidates}): "
                           "the best n of the candidates are returned.",
                           param="alignment.candidates")
        return strategy, params

    def _limit_params(self, params: StrategyParams) -> StrategyParams:
        """Hold the strategy's keys to the server's limits (see the module docstring)."""
        lowered: dict[str, int] = {}
        for key, setting in STRATEGY_LIMITS.items():
            value = getattr(params, key, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            limit = getattr(self.settings, setting)
            if value <= limit:
                continue
            if key in params.model_fields_set:
                raise APIError(f"alignment.{key} is {value}; this server allows at most {limit} "
                               f"({flag(setting)}).", param=f"alignment.{key}")
            lowered[key] = limit
        return params.model_copy(update=lowered) if lowered else params

    def _check_reward_limits(self, specs: Any) -> None:
        """Regex and schema sizes, against this server's limits (the rewards package holds
        its own, larger, ceilings)."""
        if not isinstance(specs, list) or len(specs) > self.settings.max_rewards:
            return  # the registry answers those
        for i, spec in enumerate(specs):
            if not isinstance(spec, dict):
                continue
            where = f"alignment.rewards[{i}]"
            pattern = spec.get("pattern")
            limit = self.settings.max_regex_chars
            if spec.get("name") == "regex" and isinstance(pattern, str) and len(pattern) > limit:
                raise APIError(f"{where}.pattern is {len(pattern)} characters; this server "
                               f"allows at most {limit} (--max-regex-chars).",
                               param=f"{where}.pattern")
            if spec.get("name") == "json_schema" and "schema" in spec:
                try:
                    size = len(json.dumps(spec["schema"], separators=(",", ":")).encode())
                except (TypeError, ValueError, RecursionError):
                    continue  # the registry says what is wrong with it
                limit = self.settings.max_schema_bytes
                if size > limit:
                    raise APIError(f"{where}.schema is {size} bytes as compact JSON; this "
                                   f"server allows at most {limit} (--max-schema-bytes).",
                                   param=f"{where}.schema")

    def _reward(self, spec: AlignmentRequest) -> Any:
        most = self.settings.max_rewards
        if isinstance(spec.rewards, list) and len(spec.rewards) > most:
            raise APIError(f"alignment.rewards has {len(spec.rewards)} items; this server "
                           f"allows at most {most} (--max-rewards).", param="alignment.rewards")
        self._check_reward_limits(spec.rewards)
        try:
            reward = self.rewards.build(spec.rewards, max_rewards=self.settings.max_rewards)
        except RewardSpecError as e:
            raise APIError(str(e), param=getattr(e, "param", None) or "alignment.rewards") from None
        for item in getattr(reward, "items", []):
            if hasattr(item.reward, "timeout_s") and item.reward.name in ("regex", "json_schema"):
                item.reward.timeout_s = self.settings.regex_timeout  # --regex-timeout
        return reward

    def _fit_kv(self, decode: DecodeRequest, req: SamplingFields) -> int:
        """Reserve the request's worst-case KV; 400 when it can never fit (see admission)."""
        if self.kv is None:
            return 0
        total, page = self.kv
        need = kv_slots_needed(decode, page)
        if need <= total:
            return need
        if req.requested_max_tokens() is None:
            # The server chose max_tokens: choose the most that fits instead.
            lo, hi = 0, decode.sampling.max_tokens
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if kv_slots_needed(decode, page, max_tokens=mid) <= total:
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= max(1, req.min_tokens):
                decode.sampling.max_tokens = lo
                return kv_slots_needed(decode, page)
        name = ("max_completion_tokens" if getattr(req, "max_completion_tokens", None)
                else "max_tokens")
        raise APIError(f"This request can need up to {need} KV cache slots at once "
                       f"({decode.strategy} with n={decode.n}, {len(decode.prompt_ids)} prompt "
                       f"tokens and {name}={decode.sampling.max_tokens}), more than the "
                       f"{total} this server's whole KV cache holds (--kv-cache-gib); it can "
                       f"never run. Ask for fewer tokens or fewer branches (n, candidates, beam, "
                       "top_k).", param=name)

    def _max_tokens(self, req: SamplingFields, kind: Kind, prompt_len: int, where: str) -> int:
        limit, ctx = self.settings.max_tokens_limit, self.engine.max_model_len
        if prompt_len == 0:
            raise APIError("The prompt is empty.", param=where)
        if prompt_len >= ctx:
            raise APIError(f"This model's maximum context length is {ctx} tokens. However, your "
                           f"{where} resulted in {prompt_len} tokens. Please reduce the length "
                           f"of the {where}.", param=where)
        most = self.settings.max_prompt_tokens
        if most is not None and prompt_len > most:
            raise APIError(f"Your {where} resulted in {prompt_len} tokens; this server allows at "
                           f"most {most} prompt tokens (--max-prompt-tokens).", param=where)
        requested = req.requested_max_tokens()
        if requested is None:
            # OpenAI's defaults: completions 16 tokens; chat whatever the context leaves.
            default = 16 if kind == "completion" else ctx - prompt_len
            return min(default, limit, ctx - prompt_len)
        name = ("max_completion_tokens" if getattr(req, "max_completion_tokens", None)
                else "max_tokens")
        if requested > limit:
            raise APIError(f"{name} is {requested}; this server allows at most {limit} "
                           "(--max-tokens-limit).", param=name)
        if prompt_len + requested > ctx:
            raise APIError(f"This model's maximum context length is {ctx} tokens. However, you "
                           f"requested {prompt_len + requested} tokens ({prompt_len} in the "
                           f"{where}, {requested} in the completion). Please reduce the length "
                           f"of the {where} or completion.", param=name)
        return requested

    def _finish(self, kind: Kind, req: SamplingFields, prompt_text: str, prompt_ids: list[int],
                messages: list[dict[str, str]] | None, where: str,
                request_id: str) -> Prepared:
        spec = req.alignment_or_default()
        strategy, params = self._strategy(spec, req.n)
        reward = self._reward(spec)
        max_tokens = self._max_tokens(req, kind, len(prompt_ids), where)
        if req.min_tokens > max_tokens:
            raise APIError(f"min_tokens ({req.min_tokens}) must not exceed max_tokens "
                           f"({max_tokens}).", param="min_tokens")
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        decode = DecodeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            prompt_text=prompt_text,
            sampling=req.to_sampling_params(max_tokens),
            n=req.n,
            strategy=strategy.name,
            params=params,
            reward=reward,
            stream=req.stream,
            messages=messages,
        )
        check = getattr(strategy, "check", None)
        if check is not None:  # strategy checks that need the engine or resources
            try:
                check(decode, self.engine, self.resources)
            except StrategyInputError as e:
                raise APIError(e.message, param=e.param) from None
        kv_slots = self._fit_kv(decode, req)
        return Prepared(kind=kind, request_id=request_id, created=int(time.time()),
                        model=self.served_model_name, strategy=strategy, decode=decode,
                        include_usage=req.include_usage(), kv_slots=kv_slots,
                        return_token_ids=bool(req.return_token_ids))

"""`deal`: the search's arithmetic on fixed tables, the whole search on a bigram fake engine,
and the strategy end to end on the live server."""

from __future__ import annotations

import asyncio
import contextlib
import math

import openai
import pytest
import torch
from fakes.fake_engine import FakeEngine
from pydantic import ValidationError

from alignserve.decoding.base import DecodeContext, DecodeRequest, StrategyInputError
from alignserve.decoding.deal import (
    STRATEGY,
    DealParams,
    heuristic_reward,
    length_bound,
    rank_score,
    select,
    split_commit,
    top_actions,
)
from alignserve.engine.protocol import SamplingParams, TokenTally
from alignserve.rewardmodels.compose import RewardRegistry
from alignserve.rewardmodels.lexical import LengthReward

L = math.log

# ---- pure functions on fixed tables ----------------------------------------------------------


def test_top_actions_include_eos_and_skip_banned_and_impossible():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))  # token 0 is EOS
    assert [t for t, _ in top_actions(lp, 3)] == [0, 1, 2]
    assert top_actions(lp, 2)[0][1] == pytest.approx(L(0.5))
    # before min_tokens the stop ids are banned: the next best take their place
    assert [t for t, _ in top_actions(lp, 3, banned=[0])] == [1, 2, 3]
    # an impossible token (-inf) is never an action, even when top_k asks for more
    assert [t for t, _ in top_actions(lp, 16)] == [0, 1, 2, 3]


def test_ranking_eos_action_and_a_finished_beam_stay_in_the_competition():
    # One live beam (one committed token, log-prob -1.0) whose next-token distribution is
    # [EOS .5, x .3, y .15, z .05]; top_k=3 gives the actions EOS, x, y. Rewards of their
    # (lookahead-completed) texts: EOS 0.0 (the beam's final text), x 1.0, y 0.0. A beam that
    # finished earlier ranks at -0.8 and competes with them. Ranks use the mean log-prob of
    # the committed tokens (two each here).
    acts = top_actions(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 3)
    rewards = {0: 0.0, 1: 1.0, 2: 0.0}
    for lam, expect in [(1.0, ["x", "finished"]), (0.0, ["finished", "EOS"])]:
        ranks = [-0.8] + [rank_score(-1.0 + lp, 2, rewards[t], lam) for t, lp in acts]
        names = ["finished", "EOS", "x", "y"]
        assert [names[i] for i in select(ranks, 2)] == expect
    # by hand: lambda 1: x = (-1 + ln .3) / 2 + 1 = -0.102 > finished -0.8 > EOS = -0.847
    assert rank_score(-1.0 + L(0.3), 2, 1.0, 1.0) == pytest.approx((-1.0 + L(0.3)) / 2 + 1.0)
    assert rank_score(-2.0, 4, None, 5.0) == -0.5  # no rewards: mean log-likelihood alone
    # the mean does not favour stopping: a beam that stops after 1 token at -0.5 a token
    # ranks with one that goes on for 3 at the same rate
    assert rank_score(-0.5, 1, 0.5, 2.0) == rank_score(-1.5, 3, 0.5, 2.0)
    assert select([1.0, 2.0, 2.0, 0.0], 3) == [1, 2, 0]  # ties keep the earlier candidate


def test_split_commit_takes_rollout_tokens_and_stops_at_eos():
    eos = frozenset({0})
    assert split_commit(7, -0.1, [8, 9, 4], [-0.2, -0.3, -0.4], 1, eos) == ([7], [-0.1], False)
    assert split_commit(7, -0.1, [8, 9, 4], [-0.2, -0.3, -0.4], 3, eos) == (
        [7, 8, 9], [-0.1, -0.2, -0.3], False)
    # the rollout ends in EOS within the committed part: the candidate is finished there
    assert split_commit(7, -0.1, [0, 9], [-0.2, -0.3], 3, eos) == ([7, 0], [-0.1, -0.2], True)
    assert split_commit(0, -0.1, [5], [-0.2], 3, eos) == ([0], [-0.1], True)  # EOS action
    # a rollout shorter than commit-1 (it reached max_tokens) commits what there is
    assert split_commit(7, -0.1, [8], [-0.2], 4, eos) == ([7, 8], [-0.1, -0.2], False)


def test_length_bound_depends_on_reachable_counts_not_on_the_cut():
    r = LengthReward(target=5)
    # under the target with room to reach it: 1.0 wherever the rollout was cut
    assert length_bound(r, 1, 10, 1.0) == 1.0
    assert length_bound(r, 5, 10, 1.0) == 1.0
    # no room left to reach it: the best is the farthest reachable count
    assert length_bound(r, 1, 2, 1.0) == pytest.approx(r.score_words(3))
    assert r.score_words(3) == pytest.approx(0.6)
    # past the target: stopping now is the best it can do
    assert length_bound(r, 7, 10, 1.0) == pytest.approx(r.score_words(7))
    # a negative weight takes the worst reachable value
    assert length_bound(r, 4, 10, -1.0) == r.score_words(14) == 0.0
    ranged = LengthReward(lo=3, hi=6)
    assert length_bound(ranged, 1, 1, 1.0) == pytest.approx(ranged.score_words(2))
    assert length_bound(ranged, 1, 5, 1.0) == 1.0


def test_heuristic_reward_never_rewards_an_unfinished_cut():
    reward = RewardRegistry.default().build([
        {"name": "keywords", "weight": 1.0, "keywords": ["blue"]},
        {"name": "length", "weight": 0.5, "target_words": 4}])
    texts = ["The sky is blue", "The sky", "The sky is blue"]  # 4 words is the target
    scores = reward.score(texts)
    assert scores[0].total == pytest.approx(1.0 + 0.5)
    # unfinished: 4 words (cut at the target) and 2 words rank alike on length (bound 1.0);
    # the keyword still counts on the lookahead-completed text
    cut_at_target = heuristic_reward(reward, scores[0], texts[0], False, tokens_left=10)
    cut_short = heuristic_reward(reward, scores[1], texts[1], False, tokens_left=10)
    assert cut_at_target == pytest.approx(1.0 + 0.5 * 1.0)
    assert cut_short == pytest.approx(0.0 + 0.5 * 1.0)
    # finished at 2 words is scored as it is (0.5), so it never beats going on toward 4
    finished_short = heuristic_reward(reward, scores[1], texts[1], True, tokens_left=10)
    assert finished_short == pytest.approx(0.5 * 0.5)
    assert finished_short < cut_short
    # a finished text at the target scores what the bound promised
    assert heuristic_reward(reward, scores[2], texts[2], True, 10) == pytest.approx(cut_at_target)
    assert heuristic_reward(RewardRegistry.default().build(None), None, "x", False, 3) is None


def test_params_bounds_alias_and_schema():
    p = DealParams.model_validate({"lambda": 2.5, "top_k": 5})
    assert (p.lambda_, p.top_k, p.lookahead, p.beam, p.commit, p.rollout) == (
        2.5, 5, 8, 3, 8, "greedy")
    for bad in [{"top_k": 0}, {"top_k": 17}, {"lookahead": 65}, {"lookahead": -1}, {"beam": 9},
                {"lambda": -1}, {"commit": 0}, {"commit": 17}, {"lambda_": 1}, {"depth": 2},
                {"rollout": "beam"}]:
        with pytest.raises(ValidationError):
            DealParams.model_validate(bad)
    props = DealParams.model_json_schema()["properties"]
    assert props["lambda"]["default"] == 4.0 and props["lambda"]["minimum"] == 0
    assert (props["top_k"]["maximum"], props["lookahead"]["maximum"], props["beam"]["maximum"],
            props["commit"]["maximum"]) == (16, 64, 8, 16)


# ---- the whole search on a bigram fake engine ---------------------------------------------------

# tokens: 0 EOS, 1 " yes", 2 " no", 3 " maybe", 4 " dog", 5 "Q:" (the prompt)
WORDS = ["", " yes", " no", " maybe", " dog", "Q:"]
TABLE = {  # P(next | last token)
    5: [0.05, 0.5, 0.3, 0.1, 0.05, 0.0],
    1: [0.6, 0.1, 0.05, 0.05, 0.2, 0.0],
    2: [0.3, 0.1, 0.05, 0.4, 0.15, 0.0],
    3: [0.9, 0.04, 0.03, 0.01, 0.02, 0.0],
    4: [0.7, 0.12, 0.08, 0.05, 0.05, 0.0],
    0: [1.0, 0, 0, 0, 0, 0.0],
}
# a chain whose greedy path is " a b c d" then EOS: tokens 0 EOS, 1-4 a-d, 5 "Q:", 6 " z"
CHAIN_WORDS = ["", " a", " b", " c", " d", "Q:", " z"]
CHAIN = {5: [0, .6, 0, 0, 0, 0, .4], 1: [0, 0, .6, 0, 0, 0, .4], 2: [0, 0, 0, .6, 0, 0, .4],
         3: [0, 0, 0, 0, .6, 0, .4], 4: [.6, 0, 0, 0, 0, 0, .4], 6: [.3, .25, .2, .1, .1, 0, .05],
         0: [1, 0, 0, 0, 0, 0, 0]}


def _ctx(engine, params, rewards=None, n=1, max_tokens=6, stream=False, prompt=(5,), **sampling):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, **sampling)
    req = DecodeRequest("r", list(prompt), "Q:", sp, n, "deal", DealParams.model_validate(params),
                        RewardRegistry.default().build(rewards), stream=stream)
    return DecodeContext(engine=engine, request=req)


def _run(ctx):
    async def go():
        return [e async for e in STRATEGY.run(ctx)]
    return asyncio.run(go())


def _finals(events):
    return [e for e in events if type(e).__name__ == "ChoiceFinal"]


def test_search_without_rewards_is_beam_search_with_eos_actions():
    eng = FakeEngine(WORDS, TABLE)
    events = _run(_ctx(eng, {"top_k": 2, "beam": 2, "lookahead": 0}, n=2))
    finals = _finals(events)
    # step 1: yes (ln .5), no (ln .3); step 2: yes+EOS (ln .3, finished), no+maybe (ln .12);
    # step 3: no+maybe+EOS (ln .108) -- both survivors finished: the search ends
    assert [f.text for f in finals] == [" yes", " no maybe"]
    assert [f.token_ids for f in finals] == [[1, 0], [2, 3, 0]]
    assert [f.finish_reason for f in finals] == ["stop", "stop"]
    assert finals[0].cumulative_logprob == pytest.approx(L(0.5 * 0.6))
    assert finals[1].cumulative_logprob == pytest.approx(L(0.3 * 0.4 * 0.9))
    assert finals[0].reward is None and finals[0].components == {}
    assert events[-1].candidates_scored == 0  # no rewards: nothing scored
    assert not eng.live  # every sequence released


def test_search_with_a_reward_keeps_a_finished_beam_competing():
    eng = FakeEngine(WORDS, TABLE)
    rewards = [{"name": "keywords", "keywords": ["dog"]}]
    events = _run(_ctx(eng, {"top_k": 2, "beam": 2, "lookahead": 1, "lambda": 0.5}, rewards,
                       n=2))
    finals = _finals(events)
    # ranks are mean log-prob + 0.5 * reward. Step 2 keeps yes+EOS (finished, reward 0:
    # ln .3 / 2 = -0.602) and yes+dog (rollout -> EOS: " yes dog", reward 1: ln .1 / 2 + 0.5 =
    # -0.651); at step 3 yes+dog+EOS (ln .07 / 3 + 0.5 = -0.386) wins and the finished " yes"
    # still outranks yes+dog+yes (ln .012 / 3 + 0.5 = -0.974), so it is returned second.
    assert [f.text for f in finals] == [" yes dog", " yes"]
    assert [f.reward for f in finals] == [1.0, 0.0]
    assert finals[0].components == {"keywords": 1.0}
    assert finals[0].cumulative_logprob == pytest.approx(L(0.5 * 0.2 * 0.7))
    assert events[-1].candidates_scored == 2 + 4 + 2  # texts scored per step
    assert events[-1].tally.decode == 2 + 2 + 1  # the actions fed (EOS actions need none)
    assert not eng.live


def test_commit_several_tokens_per_step_follows_the_rollout():
    results = {}
    for commit in (1, 2):
        eng = FakeEngine(CHAIN_WORDS, CHAIN)
        events = _run(_ctx(eng, {"top_k": 2, "beam": 1, "lookahead": 2, "commit": commit},
                           max_tokens=8))
        (final,) = _finals(events)
        results[commit] = (final.text, final.token_ids, final.cumulative_logprob,
                           eng.calls["fork"])
        assert not eng.live
    # both find the greedy path; committing 2 tokens a step takes fewer steps (one fork each):
    # a b | c d | EOS instead of a | b | c | d | EOS. With commit 2 the next step's actions come
    # from the rollout's logits after the second committed token.
    assert results[1][:2] == results[2][:2] == (" a b c d", [1, 2, 3, 4, 0])
    assert results[2][2] == pytest.approx(results[1][2])
    assert results[1][2] == pytest.approx(5 * L(0.6))
    assert (results[1][3], results[2][3]) == (5, 3)


def test_max_tokens_finishes_with_length_and_stream_is_the_agreed_prefix():
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    events = _run(_ctx(eng, {"top_k": 2, "beam": 2, "lookahead": 1}, max_tokens=3, stream=True))
    (final,) = _finals(events)
    assert final.finish_reason == "length" and final.token_ids == [1, 2, 3]
    deltas = [e for e in events if type(e).__name__ == "ChoiceDelta"]
    assert "".join(d.text for d in deltas) == final.text and final.streamed
    assert [t for d in deltas for t in d.token_ids] == final.token_ids


def test_stop_strings_end_a_beam_and_logprobs_cover_committed_tokens():
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    events = _run(_ctx(eng, {"top_k": 2, "beam": 1, "lookahead": 1}, stop=[" c"], max_tokens=8))
    (final,) = _finals(events)
    # the action " c" completes the stop string: the beam ends there, the text is cut before it
    assert (final.text, final.token_ids, final.finish_reason) == (" a b", [1, 2, 3], "stop")
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    events = _run(_ctx(eng, {"top_k": 2, "beam": 1, "lookahead": 2, "commit": 2},
                       max_tokens=8, logprobs=2))
    (final,) = _finals(events)
    assert [e["token_id"] for e in final.logprobs] == [1, 2, 3, 4, 0]
    assert [e["logprob"] for e in final.logprobs] == pytest.approx([L(0.6)] * 5)
    # top alternatives of the action tokens and of the tokens committed from a rollout alike
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in final.logprobs] == [
        [1, 6], [2, 6], [3, 6], [4, 6], [0, 6]]


def test_n_above_beam_is_refused_and_cancellation_frees_everything():
    eng = FakeEngine(CHAIN_WORDS, CHAIN)
    ctx = _ctx(eng, {"beam": 2}, n=3)
    with pytest.raises(StrategyInputError) as e:
        STRATEGY.check(ctx.request, eng, None)
    assert e.value.param == "alignment.beam"

    async def cancel_early():
        agen = STRATEGY.run(_ctx(eng, {"top_k": 2, "beam": 1, "lookahead": 2, "commit": 1},
                                 stream=True))
        first = await agen.__anext__()  # the first agreed token, mid-search
        await agen.aclose()  # what a client disconnect does to the strategy
        return first

    assert asyncio.run(cancel_early()).token_ids == [1]
    assert not eng.live


class _SlowSecondFork(FakeEngine):
    """A fake whose second fork of a step never completes until cancelled."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.first_fork_done = asyncio.Event()

    async def fork(self, seq, n):
        self.forks_started = getattr(self, "forks_started", 0) + 1
        if self.forks_started == 2:  # step 2's first fork: cancelled before it forks anything
            await asyncio.Event().wait()
        kids = await super().fork(seq, n)
        if self.forks_started == 3:
            self.first_fork_done.set()
        return kids


def test_cancel_while_a_step_forks_frees_the_forks_that_completed():
    # beam 2 forks two beams in parallel; a client disconnect arriving after the first fork
    # returned and while the second is in flight must release the first fork's children too
    eng = _SlowSecondFork(WORDS, TABLE)

    async def go():
        task = asyncio.ensure_future(_drain(STRATEGY.run(
            _ctx(eng, {"top_k": 2, "beam": 2, "lookahead": 1, "commit": 1}))))
        await eng.first_fork_done.wait()  # step 2's second fork returned, its first waits
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def _drain(agen):
        async with contextlib.aclosing(agen):
            async for _ in agen:
                pass

    asyncio.run(go())
    assert eng.calls["fork"] == 2 and not eng.live  # the root's and step 2's second beam's


# ---- live server ---------------------------------------------------------------------------------

WEATHER = [{"role": "user", "content": "Describe the weather today."}]


def _chat(client, model, messages, max_tokens, n=1, stream=False, **alignment):
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, n=n,
        stream=stream, extra_body={"alignment": alignment})


def test_live_deal_reaches_higher_keyword_coverage_than_greedy(client, model_name):
    rewards = [{"name": "keywords", "keywords": ["sunny", "warm"]}]
    greedy = _chat(client, model_name, WEATHER, 8, strategy="sample", rewards=rewards)
    deal = _chat(client, model_name, WEATHER, 8, strategy="deal", rewards=rewards, top_k=4,
                 lookahead=3, beam=2, **{"lambda": 5})
    g, d = greedy.choices[0].alignment["reward"], deal.choices[0].alignment["reward"]
    assert d > g, (greedy.choices[0].message.content, deal.choices[0].message.content)
    assert deal.alignment["strategy"] == "deal"
    assert deal.alignment["candidates_scored"] > 0


def test_live_deal_at_top_k_1_is_greedy_decoding(client, model_name):
    # top_k 1, beam 1: every step's one action is the greedy token, so whatever the lookahead
    # and commit, the text is greedy's. The rollouts are rolled back by truncate each step, so
    # this also checks that truncation leaves exactly the committed tokens' KV.
    msgs = [{"role": "user", "content": "Name three colors."}]
    greedy = _chat(client, model_name, msgs, 6, strategy="sample").choices[0].message.content
    for extra in ({"lookahead": 2}, {"lookahead": 3, "commit": 2}):
        r = _chat(client, model_name, msgs, 6, strategy="deal", top_k=1, beam=1, **extra)
        assert r.choices[0].message.content == greedy, extra


def test_live_deal_stream_delivers_the_final_text(client, model_name):
    msgs = [{"role": "user", "content": "Say hello."}]
    params = {"strategy": "deal", "top_k": 2, "beam": 2, "lookahead": 2}
    whole = _chat(client, model_name, msgs, 5, **params).choices[0]
    chunks = list(_chat(client, model_name, msgs, 5, stream=True, **params))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    two = _chat(client, model_name, msgs, 5, n=2, **params)
    assert len(two.choices) == 2 and two.choices[0].message.content == whole.message.content


def test_live_deal_sampled_rollouts_are_seeded_and_greedy_at_temperature_0(client, model_name):
    msgs = [{"role": "user", "content": "Write one sentence about a dog and a ball."}]
    rewards = [{"name": "keywords", "keywords": ["park"]}]
    params = {"strategy": "deal", "top_k": 2, "beam": 1, "lookahead": 4, "commit": 4,
              "rewards": rewards}

    def run(temperature, seed, **extra):
        return client.chat.completions.create(
            model=model_name, messages=msgs, max_tokens=12, temperature=temperature, seed=seed,
            extra_body={"alignment": {**params, **extra}}).choices[0]

    greedy = run(0.0, None)
    assert run(0.0, None, rollout="sample").message.content == greedy.message.content
    a, b = run(1.0, 7, rollout="sample"), run(1.0, 7, rollout="sample")
    assert a.message.content == b.message.content  # the request's seed makes it reproducible
    assert a.alignment["reward"] is not None


@pytest.mark.parametrize(("alignment", "n", "param"), [
    ({"top_k": 0}, 1, "alignment.top_k"),
    ({"lookahead": 65}, 1, "alignment.lookahead"),
    ({"lambda": -1}, 1, "alignment.lambda"),
    ({"rollout": "beam"}, 1, "alignment.rollout"),
    ({"beam": 2}, 3, "alignment.beam"),
])
def test_live_deal_bad_input_names_the_field(client, model_name, alignment, n, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model_name, WEATHER, 4, n=n, strategy="deal", **alignment)
    assert e.value.body["param"] == param


def test_engine_truncate_after_a_rollout_keeps_the_committed_kv(exact_engine):
    """The native engine: a rollout's last token is sampled but never fed; truncating back to
    the committed length must leave exactly the committed tokens' KV."""
    engine = exact_engine
    ids = engine.encode("The capital of France is")

    async def go():
        root = await engine.prefill(ids)
        (child,) = await engine.fork(root, 1)
        await engine.extend([child], [[engine.encode(" Paris")[0]]])
        async for _ in engine.generate([child], SamplingParams(temperature=0, max_tokens=4),
                                       tally=TokenTally(), kind="lookahead"):
            pass
        keep = child.token_ids[: len(ids) + 2]  # the action and one rollout token
        await engine.truncate(child, len(keep))
        assert child.token_ids == keep and not child.finished
        await engine.extend([child], [[engine.encode(".")[0]]])
        got = await engine.logits([child])
        fresh = await engine.prefill(keep + [engine.encode(".")[0]])
        want = await engine.logits([fresh])
        await engine.release([root, child, fresh])
        return got, want

    got, want = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(120)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

"""The serving process runs its tensor work on one thread (engine/compute_thread.py): a second
thread running torch ops gives the process a second OpenMP team, and on a CPU with few cores
libgomp then parks idle workers, which slowed every decode step by 1.4-1.5x
(bench/omp_teams.py). These tests check where the work runs, on the real engine."""

from __future__ import annotations

import asyncio
import threading

from alignserve.decoding import STRATEGIES
from alignserve.decoding.base import DecodeContext, DecodeRequest
from alignserve.engine import compute_thread
from alignserve.engine.protocol import SamplingParams
from alignserve.rewardmodels.compose import RewardRegistry


def _name() -> str:
    return threading.current_thread().name


def test_calls_run_on_one_thread_and_nest_in_place():
    names = {compute_thread.call(_name) for _ in range(3)}
    assert len(names) == 1 and names.pop().startswith("alignserve-compute")
    assert not compute_thread.on_compute_thread()
    # from the compute thread itself a call runs in place: queued behind itself it would hang
    inner, outer = compute_thread.call(lambda: (compute_thread.call(threading.get_ident),
                                                threading.get_ident()))
    assert inner == outer

    async def awaited():
        return await compute_thread.run(_name)

    assert asyncio.run(awaited()).startswith("alignserve-compute")
    pinned = compute_thread.pinned(_name)
    assert pinned().startswith("alignserve-compute") and pinned.__wrapped__() == _name()
    # an event loop run on the compute thread itself: `run` cannot queue behind it
    assert compute_thread.call(asyncio.run, awaited()).startswith("alignserve-compute")


class RecordingReward:
    """The request's real reward, noting which thread scores."""

    def __init__(self, inner, seen: set):
        self.inner, self.seen = inner, seen

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def score(self, texts, prompt=""):
        self.seen.add(_name())
        return self.inner.score(texts, prompt)


def test_engine_steps_and_reward_scoring_run_on_the_compute_thread(live_server):
    engine = live_server.engine
    messages = [{"role": "user", "content": "Name a color."}]
    text, ids = engine.encode_chat(messages)
    seen: set[str] = set()
    reward = RecordingReward(RewardRegistry.default().build(
        [{"name": "length", "target_words": 3}]), seen)
    req = DecodeRequest("r", ids, text, SamplingParams(temperature=1.0, max_tokens=4, seed=1), 1,
                        "best_of_n", STRATEGIES["best_of_n"].params.model_validate({"candidates": 2}),
                        reward, messages=messages)
    stepped: set[str] = set()

    async def go():
        seq = await engine.prefill(ids)
        try:
            async for _ in engine.generate([seq], SamplingParams(temperature=0, max_tokens=2),
                                           observer=lambda *a: stepped.add(_name())):
                pass
        finally:
            await engine.release([seq])
        return [e async for e in STRATEGIES["best_of_n"].run(DecodeContext(engine, req))]

    events = asyncio.run_coroutine_threadsafe(go(), engine.loop).result(300)
    assert events, "best_of_n answered nothing"
    compute = compute_thread.call(_name)
    assert stepped == {compute}
    assert seen == {compute}

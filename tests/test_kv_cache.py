"""KV-cache bookkeeping without a model: slot allocation order."""

from __future__ import annotations

import torch

from alignserve.engine.native.kv_cache import PAGE, KVCache


def test_a_prompt_after_releases_gets_one_run_of_slots():
    kv = KVCache(1, 64 * PAGE, 1, 4, torch.float32, torch.device("cpu"))
    chains = {}
    for sid, n in ((1, 5 * PAGE), (2, 3)):  # a prompt, then a sequence growing page by page
        chains[sid] = kv.new_chain(sid)
        kv.append_slots(chains[sid], n)
    for _ in range(3 * PAGE):
        kv.append_slots(chains[2], 1)
    for sid in (2, 1):  # pages return in the order sequences end, not in address order
        kv.release(chains.pop(sid), sid, chains)
    prompt = kv.new_chain(3)
    kv.append_slots(prompt, 7 * PAGE + 3)
    assert prompt[0].contiguous_range() == (0, 7 * PAGE + 3)  # attention reads it as a view
    assert prompt[0].pages == list(range(8))

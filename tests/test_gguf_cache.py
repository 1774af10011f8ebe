"""The converted-GGUF cache (alignserve/engine/native/gguf_cache.py): a cached load gives the
very model, tokenizer and config a conversion gives; bad entries and unwritable caches fall back."""

from __future__ import annotations

import pytest
import torch

from alignserve.engine.native import gguf_cache
from alignserve.engine.native.loader import load_model, resolve


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """An empty cache folder for this module (ALIGNSERVE_CACHE_DIR)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("ALIGNSERVE_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def loads(cache_dir):
    """(converted, cached) loads of the embedded model through an empty cache folder."""
    directory, gguf, _ = resolve(None)
    entry = gguf_cache.entry_for(directory, gguf)
    assert not entry.exists()
    converted = load_model(None, torch.device("cpu"), torch.float32)
    assert (entry / gguf_cache.WEIGHTS).is_file()  # the conversion was stored
    cached = load_model(None, torch.device("cpu"), torch.float32)
    return converted, cached, entry


def test_cached_load_is_the_converted_model(loads):
    (m1, tok1, name1), (m2, tok2, name2), _ = loads
    assert name1 == name2 and m1.cfg == m2.cfg
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m2.lm_head.weight is m2.embed.weight  # still tied
    messages = [{"role": "user", "content": "Héllo, wörld! Name 3 colors."}]
    assert (tok1.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tok2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    text = "The quick brown fox — 123 émojis 🦊 <|im_end|>"
    ids = tok1.encode(text, add_special_tokens=False)
    assert tok2.encode(text, add_special_tokens=False) == ids
    assert tok2.decode(ids, skip_special_tokens=True) == tok1.decode(ids, skip_special_tokens=True)
    assert (tok1.eos_token_id, len(tok1)) == (tok2.eos_token_id, len(tok2))
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(m1.embed(x), m2.embed(x))


def test_a_damaged_entry_is_ignored(loads, tmp_path):
    entry = tmp_path / "damaged"
    entry.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (entry / f).write_bytes((loads[2] / f).read_bytes())
    (entry / gguf_cache.WEIGHTS).write_bytes((loads[2] / gguf_cache.WEIGHTS).read_bytes()[:4096])
    assert gguf_cache.read(entry) is None
    assert gguf_cache.read(tmp_path / "absent") is None


def test_an_unwritable_cache_costs_only_speed(loads, tmp_path):
    (model, tok, _), _, _ = loads
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(loads[2], local_files_only=True)
    assert gguf_cache.write(blocker / "entry", cfg, tok, model) is False
    assert not (blocker / "entry").exists()


def test_the_key_follows_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = gguf_cache.entry_for(str(tmp_path), "m.gguf")
    f.write_bytes(b"other")
    assert gguf_cache.entry_for(str(tmp_path), "m.gguf") != first


def test_weights_that_do_not_fit_are_converted_again_and_replaced(loads):
    from safetensors.torch import load_file, save_file

    (converted, _, _), _, entry = loads
    weights = entry / gguf_cache.WEIGHTS
    state = load_file(weights)
    state["norm.weight"] = torch.zeros(3)  # a tensor of another shape: a damaged entry
    save_file(state, weights)
    assert not gguf_cache.load_into(converted, state, entry)
    healed, _, _ = load_model(None, torch.device("cpu"), torch.float32)
    assert torch.equal(healed.norm.weight, converted.norm.weight)
    assert load_file(weights)["norm.weight"].shape == converted.norm.weight.shape  # rewritten
    assert gguf_cache.load_into(healed, load_file(weights), entry)

"""One model format on disk (alignserve/engine/native/gguf_cache.py): a GGUF file is converted
once into a Hugging Face folder (config with `architectures`, tokenizer, safetensors under
transformers' tensor names) that the native engine, transformers and vLLM all load; the native
engine loaded from it is the model the GGUF gives; damaged folders are converted again;
an unwritable cache falls back to reading the GGUF."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from alignserve.engine.native import gguf_cache
from alignserve.engine.native.loader import _load, load_model, model_folder, resolve


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """An empty cache folder for this module (ALIGNSERVE_CACHE_DIR)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("ALIGNSERVE_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def folder(cache_dir):
    directory, gguf, _ = resolve(None)
    entry = gguf_cache.entry_for(directory, gguf)
    assert not entry.exists()
    path, name = model_folder(None)
    assert path == str(entry) and name == "SmolLM2-135M-Instruct"
    return entry


@pytest.fixture(scope="module")
def from_gguf():
    """The native model read straight from the GGUF, as before there was a folder."""
    directory, gguf, name = resolve(None)
    return _load(directory, gguf, name, torch.device("cpu"), torch.float32, False)


def test_the_folder_is_a_hugging_face_checkpoint(folder):
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "quantization_config" not in cfg
    with safe_open(str(folder / gguf_cache.WEIGHTS), framework="pt") as st:
        names = set(st.keys())
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert {"model.embed_tokens.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"} <= names
    assert not any(n.startswith(("embed.", "layers.")) for n in names)  # not our fused layout
    # a second call finds it: no conversion, same files
    before = (folder / gguf_cache.WEIGHTS).stat().st_mtime_ns
    assert model_folder(None)[0] == str(folder)
    assert (folder / gguf_cache.WEIGHTS).stat().st_mtime_ns == before


def test_the_folder_loads_the_model_the_gguf_gives(folder, from_gguf):
    m1, tok1, name1 = from_gguf
    m2, tok2, name2 = load_model(None, torch.device("cpu"), torch.float32)
    assert name1 == name2 and m1.cfg == m2.cfg
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)  # float32 both ways: bit for bit
    assert m2.lm_head.weight is m2.embed.weight  # still tied
    messages = [{"role": "user", "content": "Héllo, wörld! Name 3 colors."}]
    assert (tok1.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tok2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    text = "The quick brown fox — 123 émojis 🦊 <|im_end|>"
    ids = tok1.encode(text, add_special_tokens=False)
    assert tok2.encode(text, add_special_tokens=False) == ids
    assert tok2.decode(ids, skip_special_tokens=True) == tok1.decode(ids, skip_special_tokens=True)
    assert (tok1.eos_token_id, len(tok1)) == (tok2.eos_token_id, len(tok2))


def test_transformers_loads_the_folder_as_any_checkpoint(folder, from_gguf):
    from transformers import AutoModelForCausalLM

    _, tok, _ = from_gguf
    ids = torch.tensor([tok.encode("The capital of France is")])
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    directory, gguf, _ = resolve(None)
    ref = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    with torch.no_grad():  # the same float32 weights and code: equal bit for bit
        assert torch.equal(hf(ids).logits, ref(ids).logits)


def test_model_path_prints_the_folder(folder, cache_dir):
    out = subprocess.run([sys.executable, "-m", "alignserve.cli", "model-path"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(folder)


def test_a_damaged_folder_is_converted_again(folder, from_gguf):
    weights = folder / gguf_cache.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:4096])  # a truncated file
    healed, _, _ = load_model(None, torch.device("cpu"), torch.float32)
    assert torch.equal(healed.norm.weight, from_gguf[0].norm.weight)
    assert weights.stat().st_size > 100 * 2**20  # rewritten whole
    assert gguf_cache.complete(folder)


def test_an_unwritable_cache_reads_the_gguf(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ALIGNSERVE_CACHE_DIR", str(blocker / "cache"))
    directory, gguf, _ = resolve(None)
    with pytest.raises(OSError):
        gguf_cache.hf_folder(directory, gguf)
    model, tok, name = load_model(None, torch.device("cpu"), torch.float32, random_weights=True)
    assert name == "SmolLM2-135M-Instruct" and model.cfg.vocab_size == len(tok)
    out = subprocess.run([sys.executable, "-m", "alignserve.cli", "model-path"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("alignserve model-path: ")
    assert not (blocker / "cache").exists()


def test_the_key_follows_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    first = gguf_cache.entry_for(str(tmp_path), "m.gguf")
    f.write_bytes(b"other")
    assert gguf_cache.entry_for(str(tmp_path), "m.gguf") != first

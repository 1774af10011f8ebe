"""A decode step's attention on the CPU in one call of a small C++ kernel (`cpu_attention.cpp`).

torch's fused CPU flash attention is built for blocks of queries: a decode step hands it 3 to
48 query rows per KV head. On the embedded model's shapes over a 1,447-token prompt, one
layer's attention of a lone sequence took 0.209 ms with it (1.1 MB of bf16 KV) against 0.087 ms
here, 16 samples of the prompt 0.893 ms (with the leaves' op and the merge) against 0.306, the
prompt's causal prefill 24.4 against 11.3 ms (bench/cpu_kernels.py, side by side,
cpu_kernels-20261207-005459.json, an AMD EPYC with AVX512-BF16). The kernel takes every job of the step at once (each shared
segment with its group's rows, each row's leaf), splits them over the threads by KV head, lanes
and key chunks, and merges by log-sum-exp inside; see the .cpp file's header.

It is built at first use with the system's C++ compiler (`cpu_build.py`); where it cannot be,
`available()` is False and callers keep torch's ops. `ALIGNSERVE_CPU_ATTENTION=off` turns it
off (benchmarks compare both ways).

Inputs: fp32 queries, bf16 pools [slots, KVH, D] with D 64 or 128; outputs fp32.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
VERSION = 2  # alignserve_cpu_attention_version() of the source this module speaks to
HEAD_DIMS = (64, 128)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give a build of cpu_attention.cpp its functions' C signatures."""
    fn = lib.alignserve_decode_attention
    if fn.argtypes is None:
        fn.restype = ctypes.c_int
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [p, i64, p, p, i64, i32, i32, i32, i32, i32, p, p, p, p, p, p,
                       ctypes.c_float, p, p, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None where it cannot be (logged once)."""
    lib = cpu_build.load(SOURCE, "alignserve_cpu_attention_version", VERSION)
    return None if lib is None else declare(lib)


def bf16_scores() -> bool:
    """Whether the built kernel rounds the queries to bf16 for its scores (CPUs with AVX512-BF16
    dot products); else it computes them in fp32."""
    lib = library()
    return lib is not None and bool(lib.alignserve_cpu_attention_bf16_scores())


def available(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Whether the kernel serves fp32 queries q [B, H, D] over the pool k_pool."""
    return (cpu_build.enabled("ALIGNSERVE_CPU_ATTENTION")
            and q.device.type == "cpu" and k_pool.device.type == "cpu"
            and q.dtype == torch.float32 and k_pool.dtype == torch.bfloat16
            and q.shape[-1] in HEAD_DIMS and library() is not None)


@dataclass
class DecodeJobs:
    """A step's jobs in the kernel's packed form, built once and used by every layer: job j
    is the query rows `rows[j]` reading the slot ranges `ranges[j]`; a causal job's last
    len(rows) keys are its rows' own tokens in order, and row i sees the keys up to its own."""

    n_rows: int
    n_jobs: int
    row_off: torch.Tensor  # int32 [n_jobs + 1]
    rows: torch.Tensor  # int32
    rng_off: torch.Tensor  # int32 [n_jobs + 1]
    lo: torch.Tensor  # int32
    hi: torch.Tensor  # int32
    causal: torch.Tensor  # int32 [n_jobs], 0 or 1

    @classmethod
    def build(cls, n_rows: int, jobs: list[tuple[list[int], list[tuple[int, int]]]],
              causal: list[bool] | None = None) -> DecodeJobs:
        row_off, rows, rng_off, lo, hi = array("i", [0]), array("i"), array("i", [0]), \
            array("i"), array("i")
        flags = array("i", [int(c) for c in causal] if causal is not None else [0] * len(jobs))
        for job_rows, job_ranges in jobs:
            rows.extend(job_rows)
            row_off.append(len(rows))
            for a, b in job_ranges:
                lo.append(a)
                hi.append(b)
            rng_off.append(len(lo))

        def t(a: array) -> torch.Tensor:
            return torch.frombuffer(a, dtype=torch.int32) if len(a) else torch.zeros(1, dtype=torch.int32)

        return cls(n_rows, len(jobs), t(row_off), t(rows), t(rng_off), t(lo), t(hi), t(flags))


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     jobs: DecodeJobs, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out fp32 [B, H, D], lse fp32 [B, H]) of q [B, H, D] (fp32, rows contiguous) over one
    layer's pools [slots, KVH, D] (bf16): each row attends to the keys of every job that holds
    it; a row in none gets out 0 and lse -inf. Check `available` first."""
    lib = library()
    b, h, d = q.shape
    kvh = k_pool.shape[1]
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    if k_pool.stride()[1:] != (d, 1) or v_pool.stride() != k_pool.stride():
        raise ValueError("the pools must be [slots, KVH, D] with heads and dimensions contiguous")
    out = torch.empty(b, h, d, dtype=torch.float32)
    lse = torch.empty(b, h, dtype=torch.float32)
    rc = lib.alignserve_decode_attention(
        q.data_ptr(), q.stride(0), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.stride(0),
        b, h, kvh, d, jobs.n_jobs, jobs.row_off.data_ptr(), jobs.rows.data_ptr(),
        jobs.rng_off.data_ptr(), jobs.lo.data_ptr(), jobs.hi.data_ptr(), jobs.causal.data_ptr(), scale,
        out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("the CPU attention kernel could not allocate its work buffers")
    if rc != 0:
        raise ValueError(f"the CPU attention kernel refused head_dim {d}")
    return out, lse

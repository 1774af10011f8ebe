"""Sampling a batch's rows on the CPU in one pass of a small C++ kernel (`cpu_sampling.cpp`).

The reference sampler draws each row's noise from its own seeded torch.Generator (a generator
per row and step, a uniform draw, a log), then a softmax, a division and an argmax over the
vocabulary: 8.56 ms for 16 rows of the embedded model's 49,152 tokens, against 0.57 ms here
(bench/cpu_kernels.py, side by side, cpu_kernels-20261207-005459.json). Here one pass per row
computes the Triton kernel's counter-based Gumbel noise (the same draws as on a GPU, up to the
last bit of a logarithm) and the argmax of scores / T + noise, rows over the threads. A row
with top-k, top-p or min-p is handed over already filtered (`dispatch.sample`: the reference's
kept set, -inf elsewhere), so its draw uses the same noise as an unfiltered row's.

Built at first use with the system's C++ compiler (`cpu_build.py`); where it cannot be,
`available()` is False. `ALIGNSERVE_CPU_SAMPLING=off` turns it off.
"""

from __future__ import annotations

import ctypes
from array import array
from pathlib import Path

import torch

from . import cpu_build

SOURCE = Path(__file__).with_name("cpu_sampling.cpp")
VERSION = 1


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None where it cannot be (logged once)."""
    lib = cpu_build.load(SOURCE, "alignserve_cpu_sampling_version", VERSION)
    if lib is not None and lib.alignserve_sample_gumbel.argtypes is None:
        p = ctypes.c_void_p
        lib.alignserve_sample_gumbel.restype = None
        lib.alignserve_sample_gumbel.argtypes = [p, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                                 p, p, p, ctypes.c_int]
    return lib


def available(scores: torch.Tensor) -> bool:
    """Whether the kernel serves scores like these (CPU, 2-D)."""
    return (cpu_build.enabled("ALIGNSERVE_CPU_SAMPLING")
            and scores.device.type == "cpu" and scores.dim() == 2
            and library() is not None)


def sample(scores: torch.Tensor, temperature: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Token ids [B] (int64): argmax of scores / T + the row's Gumbel noise (seeds: one int
    per row, reduced to 64 bits); rows with T <= 1e-5 greedy. Check `available` first."""
    x = scores.float()
    if x.stride(1) != 1:
        x = x.contiguous()
    temps = temperature.float().contiguous()
    seed_buf = array("Q", [int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds])
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().alignserve_sample_gumbel(
        x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], temps.data_ptr(),
        seed_buf.buffer_info()[0], out.data_ptr(), torch.get_num_threads())
    return out

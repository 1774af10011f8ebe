"""Kernels of the native engine, each a PyTorch reference beside its Triton version.

- attention.py / attention_triton.py: decode attention over the KV slot pool (a shared segment
  for a group of queries, each sequence's own leaf) and the exact log-sum-exp merge;
- sampling.py, logits_ops.py / sampling_triton.py: per-row logit processing (penalties,
  contrastive, VAS, temperature, top-k / top-p / min-p) and Gumbel-max sampling;
- attention_cpu.py + cpu_attention.cpp, sampling_cpu.py + cpu_sampling.cpp: the same work on a
  CPU in C++ (a decode step's or a prompt's attention in one call, unfiltered sampling in one
  pass), built at first use by cpu_build.py with the machine's compiler;
- dispatch.py: what the engine calls; Triton on CUDA tensors, the C++ kernels on a CPU where
  they serve, the references elsewhere.

The *_triton modules import triton and are only imported by dispatch when a kernel runs there.
"""

"""Kernels of the native engine, each a PyTorch reference beside its Triton version.

- attention.py / attention_triton.py: decode attention over the KV slot pool (a shared segment
  for a group of queries, each sequence's own leaf) and the exact log-sum-exp merge;
- sampling.py, logits_ops.py / sampling_triton.py: per-row logit processing (penalties,
  contrastive, VAS, temperature, top-k / top-p / min-p) and Gumbel-max sampling;
- dispatch.py: what the engine calls; Triton on CUDA tensors, the references elsewhere.

The *_triton modules import triton and are only imported by dispatch when a kernel runs there.
"""

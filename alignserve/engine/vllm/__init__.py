"""The vLLM engine (pinned vllm==0.25.*): the engine protocol on vLLM's AsyncLLM.

engine.py            VllmEngine: the protocol mapped onto vLLM requests (see its docstring)
logits_processor.py  AlignLogitsProcessor: vas and contrastive inside vLLM's engine core
side_model.py        what that processor runs beside vLLM (amateur models, hidden states)
spec.py              the per-request arguments the processor reads from extra_args
metrics.py           vLLM's own vllm:* metrics, read and re-exposed beside ours
amateurs.py          served contrastive amateurs, as the API process describes them

Nothing here imports vllm at module level: importing alignserve never needs it.
"""

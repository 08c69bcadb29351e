# The official vLLM OpenAI image plus the engine plugins; the image's vLLM is the one the
# plugins are pinned to (vllm==0.32.0).
#   docker build -f docker/worker.Dockerfile -t ghcr.io/fireworks-gateway/worker:0.1.0 .
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/fireworks-gateway
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY gateway ./gateway
COPY engine_plugins ./engine_plugins
# --no-deps: keep the image's own vLLM and torch; the gateway's light deps come along for
# the entry-point metadata only.
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir -c requirements/gateway.lock pydantic-settings typer
ENV VLLM_USE_V2_MODEL_RUNNER=0
ENTRYPOINT ["python3", "-m", "engine_plugins.worker"]

# The gateway alone: small, no vLLM, no torch.
#   docker build -f docker/gateway.Dockerfile -t ghcr.io/fireworks-gateway/gateway:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY gateway ./gateway
COPY engine_plugins ./engine_plugins
RUN pip install --no-cache-dir -c requirements/gateway.lock . && useradd --uid 10001 --no-create-home gateway
USER 10001
EXPOSE 8000
ENV GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000
CMD ["fireworks-gateway", "serve"]

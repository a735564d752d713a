# The eigenwatch sidecar image: the wheel plus its runtime (numpy, grpcio, prometheus-client,
# onnxruntime); no torch, no vLLM; runs as a non-root user.
#   docker build -t eigenwatch/sidecar:0.1.0 .
# tests/test_deploy_image.py lints this file with hadolint and runs its install steps and
# HEALTHCHECK in a clean virtualenv (no container daemon on the test machines).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY . .
# The build backend (setuptools, grpcio-tools for the gRPC stubs) comes from pyproject.toml.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir dist .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EIGENWATCH_HEALTH_TARGET=127.0.0.1:50151
RUN groupadd --system --gid 10001 eigenwatch \
    && useradd --system --uid 10001 --gid eigenwatch --no-create-home --shell /usr/sbin/nologin eigenwatch
WORKDIR /opt/eigenwatch
COPY --from=build /src/dist ./dist
RUN pip install --no-cache-dir ./dist/eigenwatch-*.whl && rm -rf ./dist
USER 10001:10001
EXPOSE 50151 9400
# Health through the gRPC health service (the chart's exec probes run the same command).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; target = os.environ.get('EIGENWATCH_HEALTH_TARGET', '127.0.0.1:50151'); reply = g.HealthStub(grpc.insecure_channel(target)).Check(h.HealthCheckRequest(), timeout=3); sys.exit(reply.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["eigenwatch", "sidecar"]
# A non-loopback address needs a token (EIGENWATCH_TOKEN or --token-file) or client certificates.
CMD ["--listen", "0.0.0.0:50151", "--metrics-host", "0.0.0.0", "--metrics-port", "9400"]

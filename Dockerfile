# Lethe service image. Entry point `lethe`; the default command is `lethe serve` (gRPC API, in-process
# worker, /metrics). The same image runs `lethe audit verify` and the scale-out workers:
#   lethe worker                                   a worker pool (LETHE_EXECUTOR=external on the API replicas)
#   lethe worker --once --job-id ID --attempt N    one unlearning job: what each Kubernetes Job runs
#                                                  (LETHE_EXECUTOR=kubernetes on the API replicas)
# The Helm chart (helm/lethe) uses these commands.
#
# Build from the repository root (no Docker engine runs on the CI machines, so CI checks this file with
# hadolint and tests/helm/test_image.py instead of building it):
#   docker build -t lethe:0.1.0 .                     # CPU PyTorch, as in development and CI
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t lethe:0.1.0-cuda .
# TORCH_INDEX selects a CUDA build of PyTorch for GPU nodes; TORCH_SPEC pins its version.
#
# The runtime user is numeric (10001) so that Kubernetes can enforce runAsNonRoot. The chart runs the image
# with a read-only root filesystem and a volume at LETHE_STATE_DIR (also HOME) and /tmp: nothing else is
# written at run time (byte code and the gRPC code are generated here, at build time).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/lethe \
    LETHE_STATE_DIR=/var/lib/lethe \
    LETHE_GRPC_HOST=0.0.0.0 \
    LETHE_METRICS_HOST=0.0.0.0

WORKDIR /app
RUN groupadd --system --gid 10001 lethe \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/lethe --shell /usr/sbin/nologin lethe
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY proto ./proto
COPY unlearn ./unlearn
COPY continual ./continual
COPY service ./service
# Editable install: the gRPC code is generated at build time next to the sources (as root), so the
# unprivileged runtime user finds it fresh and never needs to write into the image.
# DL3013 (pin pip versions): torch is pinned by TORCH_SPEC; the project's own ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else pip install --no-cache-dir "$TORCH_SPEC"; fi \
 && pip install --no-cache-dir -c constraints/cpu.txt -e . \
 && python -m service.api.codegen \
 && python -m compileall -q service unlearn

USER 10001:10001
EXPOSE 50051 9464
ENTRYPOINT ["lethe"]
CMD ["serve"]

# Lethe service image. Default command `lethe serve` (the API replicas); the same image runs the workers:
#   lethe worker                                   a worker pool (LETHE_EXECUTOR=external on the API replicas)
#   lethe worker --once --job-id ID --attempt N    one unlearning job: what each Kubernetes Job runs
#                                                  (LETHE_EXECUTOR=kubernetes on the API replicas)
# Build: docker build -t lethe:dev .            (CPU torch, as in development and CI)
#        docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t lethe:gpu .
# Not built in CI (no Docker engine on the CI machines); the same install commands run in `make test`.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    LETHE_STATE_DIR=/var/lib/lethe \
    LETHE_GRPC_HOST=0.0.0.0 \
    LETHE_METRICS_HOST=0.0.0.0

WORKDIR /app
RUN useradd --system --create-home --home-dir /var/lib/lethe lethe
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY proto ./proto
COPY unlearn ./unlearn
COPY service ./service
# Editable install: the gRPC code is generated at build time next to the sources (as root), so the
# unprivileged runtime user finds it fresh and never needs to write into the image.
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else pip install --no-cache-dir "$TORCH_SPEC"; fi \
 && pip install --no-cache-dir -c constraints/cpu.txt -e . \
 && python -m service.api.codegen

USER lethe
EXPOSE 50051 9464
ENTRYPOINT ["lethe"]
CMD ["serve"]

# The MLflow tracking server's image (k8s/base/mlflow.yaml): mlflow with its basic-auth app, the PostgreSQL
# driver and boto3 for the S3 artifact store -- no torch, no CUDA libraries, none of the pipeline's tools.
# The component image (docker/Dockerfile, 7.7 GB, most of it CUDA) ran this pod before; see
# docs/cluster.md ("Images") for both sizes and pull times. Build with `docker/build.sh tracking`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT=120

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --gid 1000 m2snet \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash m2snet

# The versions are the component image's (docker/constraints.txt); the two packages only the basic-auth
# app needs (mlflow[auth]) are not in it and are pinned in tracking-requirements.txt.
COPY docker/constraints.txt docker/tracking-requirements.txt /tmp/
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --constraint /tmp/constraints.txt --requirement /tmp/tracking-requirements.txt \
    && rm /tmp/constraints.txt /tmp/tracking-requirements.txt \
    && python3 -c "import mlflow.server.auth, psycopg2, boto3; print('mlflow', mlflow.__version__)"

USER 1000:1000
WORKDIR /home/m2snet
ENTRYPOINT []
CMD ["mlflow", "server", "--help"]

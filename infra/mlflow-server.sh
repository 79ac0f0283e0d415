#!/usr/bin/env bash
# Start an MLflow tracking server: SQLite (or any SQLAlchemy URI) backend, artifacts proxied to an
# object store so training clients need no S3 credentials of their own.
# usage: infra/mlflow-server.sh BACKEND_URI ARTIFACTS_URI [PORT] [HOST]
#   e.g. infra/mlflow-server.sh sqlite:////data/mlflow.db s3://tessera/mlflow 5000 0.0.0.0
# The server's environment must hold MLFLOW_S3_ENDPOINT_URL (non-AWS S3), AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY. Clients then set MLFLOW_TRACKING_URI=http://HOST:PORT.
set -euo pipefail
BACKEND=${1:?backend store URI}; ARTIFACTS=${2:?artifacts destination URI}
PORT=${3:-5000}; HOST=${4:-127.0.0.1}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
EXTRA=()
# Non-loopback binds must name the hosts clients use (MLflow rejects other Host headers).
if [ "$HOST" != 127.0.0.1 ] && [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then EXTRA+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
exec mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers "${MLFLOW_WORKERS:-2}" "${EXTRA[@]}"

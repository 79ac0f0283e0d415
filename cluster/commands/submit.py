"""``tessera submit``: run a tessera command as a Ray job on an existing cluster, and follow it.

    tessera submit --address http://head:8265 -- train dalle --config configs/dalle/small.toml
    tessera submit --address http://head:8265 --status JOB_ID | --logs JOB_ID | --stop JOB_ID

The project folder is uploaded as the job's working directory (run folders, the venv and git data
left out); the command runs there with the cluster's Python (the Tessera image). Only non-secret
settings travel in the job's ``runtime_env`` by default: Ray writes runtime_env variables in plain text
to its logs and job table, so cluster nodes should get object-store credentials from their own
environment (a Kubernetes Secret, an instance role). ``--forward-secrets`` sends them anyway, with a
warning. Exit code: 0 when the job SUCCEEDED, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time

log = logging.getLogger(__name__)

# Settings a job needs to behave like a local run; none of them is a credential.
FORWARDED = (
    "DS_ACCELERATOR",
    "OMP_NUM_THREADS",
    "GLOO_SOCKET_IFNAME",
    "TORCH_EXTENSIONS_DIR",
    "AWS_ENDPOINT_URL",
)
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD")
EXCLUDES = ["runs/", ".venv/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run a tessera command as a Ray job on a cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"), help="Ray dashboard URL"
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    action.add_argument("--logs", metavar="JOB_ID", help="print a job's logs so far")
    action.add_argument("--stop", metavar="JOB_ID", help="stop a running job")
    parser.add_argument("--cpus", type=float, default=0, help="CPUs reserved for the job's driver")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs reserved for the job's driver")
    parser.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument(
        "--forward-secrets", action="store_true", help="also send AWS/MLflow credentials (Ray logs them!)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the tessera command to run")
    parser.set_defaults(func=main)


def job_env(forward_secrets: bool) -> dict[str, str]:
    """What the job's runtime_env carries: settings always, credentials only on request."""
    names = FORWARDED + (SECRETS if forward_secrets else ())
    env = {name: os.environ[name] for name in names if name in os.environ}
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and ("@" not in uri or forward_secrets):  # user:password@host is a credential too
        env["MLFLOW_TRACKING_URI"] = uri
    if forward_secrets:
        log.warning(
            "--forward-secrets: credentials go into the job's runtime_env, which Ray writes in plain text to "
            "runtime_env_agent.log and the dashboard's job table"
        )
    return env


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait(client, job_id: str, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    try:
        asyncio.run(_follow(client, job_id))
    except Exception as exc:  # the log stream is a convenience; the status below is the answer
        log.warning("log stream ended early (%s); polling the job status", exc)
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def submit_when_ready(client, deadline_s: float = 120.0, **job) -> str:
    """``submit_job``, retried while a freshly started head says its job agent is not up yet."""
    deadline, wait_s = time.monotonic() + deadline_s, 1.0
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            log.info("the cluster's job agent is not ready yet; retrying in %.0f s", wait_s)
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, 10.0)


def main(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.status:
        print(client.get_job_status(args.status).value)
        return 0
    if args.logs:
        print(client.get_job_logs(args.logs), end="")
        return 0
    if args.stop:
        client.stop_job(args.stop)
        print(f"stop requested for {args.stop}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit(
            "tessera submit: give the command after --, e.g. tessera submit -- train dvae --config ..."
        )
    job_id = submit_when_ready(
        client,
        entrypoint=shlex.join(["python", "-m", "cluster.cli", *command]),
        runtime_env={
            "working_dir": args.working_dir,
            "excludes": EXCLUDES,
            "env_vars": job_env(args.forward_secrets),
        },
        entrypoint_num_cpus=args.cpus or None,
        entrypoint_num_gpus=args.gpus or None,
    )
    print(f"submitted {job_id} to {args.address}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    status = wait(client, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1

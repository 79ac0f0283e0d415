"""The stage graph: ``tessera pipeline --preset NAME`` runs a preset's stages on Ray, skipping finished work.

A preset (``configs/pipeline/<name>.toml``) is the graph as data: each stage is a ``tessera`` command
line plus the stages it runs after. Every stage gets a **key**: the sha256 of its command line (with
variables filled in), the bytes of every file the command names (its TOML configs) and the keys of the
stages it depends on. A stage whose key has a FINISHED MLflow run in the pipeline experiment is
skipped; so a rerun after a crash continues where it stopped, and changing one stage's config changes
its key and every dependant's, and nothing else. Each executed stage is an MLflow run nested under the
pipeline's parent run, tagged with its key, the keys it depends on, its command and the git commit,
with the command's log as an artifact. Stages whose dependencies are done run as Ray tasks, so
independent branches run side by side; each command joins the same Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.net import TORCH_DIST_ENV
from trainer.tracking import Tracker, default_tracking_uri, find_finished_runs

log = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "pipeline"


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(description="tessera command line; {name} fills in a variable")
    after: list[str] = Field(default_factory=list, description="stages that must finish first")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    experiment: str = "tessera-pipeline"
    max_parallel: int = Field(2, ge=1, description="stages running at once (each may start its own workers)")
    vars: dict[str, str] = Field(default_factory=dict, description="values for {name} in command lines")
    stages: dict[str, StageSpec]

    @model_validator(mode="after")
    def _graph(self) -> PipelineSpec:
        for name, stage in self.stages.items():
            unknown = [dep for dep in stage.after if dep not in self.stages]
            if unknown:
                raise ValueError(f"stages.{name}.after names unknown stages {unknown}")
        self.order()  # raises on a cycle
        return self

    def order(self) -> list[str]:
        """Stages in an order where every stage comes after its dependencies (file order otherwise)."""
        done: list[str] = []
        pending = list(self.stages)
        while pending:
            ready = [name for name in pending if all(dep in done for dep in self.stages[name].after)]
            if not ready:
                raise ValueError(f"stages {pending} depend on each other in a cycle")
            done += ready
            pending = [name for name in pending if name not in ready]
        return done

    def command(self, name: str, overrides: dict[str, str] | None = None) -> list[str]:
        values = {**self.vars, **(overrides or {})}
        for _ in range(len(values)):  # variables may refer to variables
            values = {key: value.format(**values) for key, value in values.items()}
        return [part.format(**values) for part in self.stages[name].argv]

    def dependants(self, names: set[str]) -> set[str]:
        """``names`` and every stage downstream of them."""
        found = set(names)
        for name in self.order():
            if any(dep in found for dep in self.stages[name].after):
                found.add(name)
        return found

    def upstream(self, names: set[str]) -> set[str]:
        """``names`` and every stage they depend on, directly or not."""
        found = set(names)
        for name in reversed(self.order()):
            if name in found:
                found.update(self.stages[name].after)
        return found


def load_preset(preset: str) -> PipelineSpec:
    """``configs/pipeline/<preset>.toml`` (or a TOML path) as a validated graph."""
    from cluster.config import load_config

    path = Path(preset) if preset.endswith(".toml") else PRESET_DIR / f"{preset}.toml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise FileNotFoundError(f"no pipeline preset {preset!r} ({path}); known: {known}")
    return load_config(PipelineSpec, path)


def _file_digest(part: str) -> str | None:
    path = Path(part)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def stage_keys(spec: PipelineSpec, variables: dict[str, str]) -> dict[str, str]:
    """Each stage's key: its command, the files it names, and the keys it depends on."""
    keys: dict[str, str] = {}
    for name in spec.order():
        argv = spec.command(name, variables)
        identity = {
            "stage": name,
            "argv": argv,
            "files": {part: digest for part in argv if (digest := _file_digest(part))},
            "after": {dep: keys[dep] for dep in spec.stages[name].after},
        }
        keys[name] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return keys


@dataclass
class PlannedStage:
    name: str
    key: str
    action: str  # "run" | "skip" | "out of scope"
    reason: str
    argv: list[str]


def plan(
    spec: PipelineSpec,
    variables: dict[str, str],
    *,
    only: list[str] | None = None,
    start: str | None = None,
    tracking_uri: str | None = None,
) -> list[PlannedStage]:
    """What a run would do, stage by stage, and why."""
    unknown = [name for name in [*(only or []), *([start] if start else [])] if name not in spec.stages]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; this pipeline has {spec.order()}")
    keys = stage_keys(spec, variables)
    scope = set(spec.stages)
    if only:
        scope = set(only)
    if start:
        scope &= spec.dependants({start})
    forced = spec.dependants({start}) if start else set()
    uri = tracking_uri or default_tracking_uri()
    planned = []
    for name in spec.order():
        argv = spec.command(name, variables)
        if name not in scope:
            planned.append(PlannedStage(name, keys[name], "out of scope", "not selected", argv))
        elif name in forced:
            planned.append(PlannedStage(name, keys[name], "run", f"--from {start}", argv))
        elif runs := find_finished_runs(uri, spec.experiment, {"pipeline.key": keys[name]}):
            planned.append(
                PlannedStage(name, keys[name], "skip", f"finished run {runs[0]} has this key", argv)
            )
        else:
            planned.append(PlannedStage(name, keys[name], "run", "no finished run with this key", argv))
    return planned


def format_plan(planned: list[PlannedStage]) -> str:
    width = max(len("stage"), *(len(p.name) for p in planned)) + 1
    rows = [f"{'stage':<{width}} {'action':<13} {'key':<12} why"]
    rows += [f"{p.name:<{width}} {p.action:<13} {p.key[:12]:<12} {p.reason}" for p in planned]
    return "\n".join(rows)


def stages_sharing_cores(running: int, launching: int, max_parallel: int) -> int:
    """How many stages the cores are split between for the ones starting now: all of them for a
    stage that starts alone (nothing running, nothing else ready), since no other stage can become
    ready before a running one finishes; else ``max_parallel``."""
    return 1 if running == 0 and launching == 1 else max_parallel


def stage_env(environ: dict[str, str], tracking_uri: str, sharing: int, cpus: int) -> dict[str, str]:
    """The environment a stage's command runs in, when ``sharing`` stages share the cores.

    A stage is its own world: a process group of this process (its MASTER_PORT) must not leak into it.
    Each stage gets ``cpus // sharing`` intra-op threads unless the caller chose: torch sizes its
    OpenMP pool from ``OMP_NUM_THREADS`` when it is imported, and stages each spinning up one thread
    per core thrash (two dVAE stages on 2 cores: 0.57 s/step each at 2 threads vs 0.17 s/step at 1)."""
    env = {k: v for k, v in environ.items() if k not in TORCH_DIST_ENV}
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // sharing)))
    return env | {"MLFLOW_TRACKING_URI": tracking_uri}


@ray.remote(num_cpus=0)  # orchestration only: the command asks Ray for the CPUs its own work needs
def _run_command(argv: list[str], cwd: str, env: dict[str, str], log_path: str) -> tuple[int, float]:
    started = time.monotonic()
    with open(log_path, "w") as handle:
        code = subprocess.run(
            [sys.executable, "-m", "cluster.cli", *argv],
            cwd=cwd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        ).returncode
    return code, time.monotonic() - started


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=PRESET_DIR
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class PipelineFailed(RuntimeError):
    """A stage's command exited non-zero; its log holds the reason."""


def run(
    spec: PipelineSpec,
    variables: dict[str, str],
    run_dir: str,
    *,
    ray_address: str,
    only: list[str] | None = None,
    start: str | None = None,
) -> dict[str, Any]:
    """Execute the plan on the Ray cluster the caller connected to; returns what ran and what was skipped."""
    uri = default_tracking_uri()
    planned = plan(spec, variables, only=only, start=start, tracking_uri=uri)
    log.info("pipeline %s plan:\n%s", spec.name, format_plan(planned))
    by_name = {p.name: p for p in planned}
    logs = Path(run_dir, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    commit = _git_commit()
    summary: dict[str, Any] = {"pipeline": spec.name, "ran": [], "skipped": [], "seconds": {}}
    parent = Tracker(
        spec.experiment, f"pipeline-{spec.name}", run_dir=run_dir, tags={"pipeline.preset": spec.name}
    )
    parent.log_params({"vars": {**spec.vars, **variables}, "only": only or [], "from": start or ""})
    pending = {p.name for p in planned if p.action == "run"}
    done = {p.name for p in planned if p.action != "run"}
    summary["skipped"] = sorted(p.name for p in planned if p.action == "skip")
    running: dict[Any, tuple[str, Tracker]] = {}
    status, started = "FAILED", time.monotonic()
    try:
        while pending or running:
            startable = [
                n for n in spec.order() if n in pending and all(d in done for d in spec.stages[n].after)
            ]
            launching = startable[: spec.max_parallel - len(running)]
            sharing = stages_sharing_cores(len(running), len(launching), spec.max_parallel)
            env = stage_env(dict(os.environ), uri, sharing, os.cpu_count() or 1)
            for name in launching:
                pending.discard(name)
                stage = by_name[name]
                tags = {
                    "mlflow.parentRunId": parent.run_id,
                    "pipeline.preset": spec.name,
                    "pipeline.stage": name,
                    "pipeline.key": stage.key,
                    "pipeline.after": json.dumps({dep: by_name[dep].key for dep in spec.stages[name].after}),
                    "pipeline.command": shlex.join(["tessera", *stage.argv]),
                    "git.commit": commit,
                }
                tracker = Tracker(spec.experiment, name, run_dir=run_dir, tags=tags)
                argv = [*stage.argv, "--ray-address", ray_address]
                log.info("pipeline: %s starts (%s)", name, stage.reason)
                ref = _run_command.remote(argv, os.getcwd(), env, str(logs / f"{name}.log"))
                running[ref] = (name, tracker)
            ready, _ = ray.wait(list(running), num_returns=1)
            name, tracker = running.pop(ready[0])
            code, seconds = ray.get(ready[0])
            tracker.log_metrics({"seconds": seconds, "exit_code": code}, step=0)
            tracker.log_artifact(logs / f"{name}.log", "logs")
            summary["seconds"][name] = round(seconds, 1)
            if code != 0:
                tracker.close("FAILED")
                tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
                raise PipelineFailed(
                    f"stage {name} exited {code}; last lines of {logs / name}.log:\n" + "\n".join(tail)
                )
            tracker.close("FINISHED")
            done.add(name)
            summary["ran"].append(name)
            log.info(
                "pipeline: %s finished in %.0f s (%d of %d left)",
                name,
                seconds,
                len(pending) + len(running),
                len(planned),
            )
        status = "FINISHED"
    finally:
        for ref, (_, tracker) in running.items():  # a failed stage stops its siblings too
            ray.cancel(ref, force=True)
            tracker.close("KILLED")
        summary["total_seconds"] = round(time.monotonic() - started, 1)
        parent.log_metrics(
            {"stages_ran": len(summary["ran"]), "stages_skipped": len(summary["skipped"])}, step=0
        )
        parent.close(status)
    return summary

"""``tessera train ppo``: PPO of the DALL-E policy against a reward model, on a Ray actor group.

The driver (this process) reads prompts with the resumable loader, asks the actors for rollouts,
reference log-probs, rewards and values (the last three concurrently), computes shaped rewards and
GAE itself, and sends the PPO batch back to the policy and critic. After every iteration both engines
checkpoint and the driver publishes ``ppo_state.json`` (iteration, KL coefficient, loader state, the
two checkpoint URLs) last, so a crash anywhere resumes from the last whole iteration. An actor that
dies mid-iteration is restarted by Ray; the group is rolled back to the last state and the iteration
runs again — the run goes on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.rl.actors import RESTARTS, CriticActor, PolicyActor, ReferenceActor, RewardActor
from data_pipeline import storage
from data_pipeline.loader import open_loader
from data_pipeline.manifest import load_manifest
from trainer.config import DataConfig, EngineConfig, RunConfig
from trainer.grids import labelled_grid
from trainer.inference import checkpoint_or_newest, load_frozen_dvae
from trainer.losses.rlhf import explained_variance, masked_mean
from trainer.models.dalle import DalleConfig
from trainer.rlhf.ppo import AdaptiveKLController, PPOSettings, advantages_and_returns, shape_rewards
from trainer.stages.loop import checkpoint_dir_of, run_dir_of
from trainer.stages.reward import with_sft
from trainer.tracking import Tracker

log = logging.getLogger(__name__)
STATE_FILE = "ppo_state.json"
DRIVES_RAY = True  # `tessera train` connects to Ray before calling train()


class RLHFInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sft_checkpoint: str = Field(description="the DALL-E (SFT) checkpoint (or a run's checkpoint folder)")
    reward_checkpoint: str = Field(description="a `tessera train reward` checkpoint (or its run's folder)")


class PPOGrids(BaseModel):
    """Rollouts decoded to images with their prompts under them, logged every ``every`` iterations."""

    model_config = ConfigDict(extra="forbid")

    dvae_checkpoint: str | None = Field(
        None, description="the SFT's dVAE (or its run's folder); None: no grids"
    )
    every: int = Field(1, ge=1)
    images: int = Field(8, ge=1)


class ActorResources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


class PPOStageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=lambda: RunConfig(name="ppo"))
    engine: EngineConfig = Field(default_factory=EngineConfig)
    data: DataConfig = Field(description="prompts: the captions of data.manifest")
    model: DalleConfig | None = Field(None, description="default: the SFT checkpoint's own (its model.json)")
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    critic_lr: float = Field(1e-4, gt=0)
    rlhf: RLHFInputs
    grids: PPOGrids = Field(default_factory=PPOGrids)
    resources: ActorResources = Field(default_factory=ActorResources)

    @model_validator(mode="after")
    def _consistent(self) -> PPOStageConfig:
        per_step = self.engine.micro_batch_size * self.engine.grad_accum
        if per_step != self.ppo.prompts_per_iteration:
            raise ValueError(
                f"engine.micro_batch_size * engine.grad_accum ({per_step}) must equal "
                f"ppo.prompts_per_iteration ({self.ppo.prompts_per_iteration}): one PPO epoch = one step"
            )
        if self.engine.total_steps < self.ppo.iterations * self.ppo.ppo_epochs:
            raise ValueError(
                "engine.total_steps must be >= ppo.iterations * ppo.ppo_epochs (the LR schedule's length)"
            )
        if not self.data.tokenizer:
            raise ValueError("data.tokenizer is required: the policy reads captions")
        return self


CONFIG = PPOStageConfig


def actor_name(config: PPOStageConfig, role: str) -> str:
    """Ray name of one actor of a run's group (``ray.get_actor`` finds it, e.g. to inspect or kill it)."""
    return f"tessera-{config.run.name}-{role}"


class _Group:
    """The four actors, packed into one placement group."""

    def __init__(self, config: PPOStageConfig) -> None:
        res = config.resources
        bundle = {"CPU": res.cpus_per_actor, **({"GPU": res.gpus_per_actor} if res.gpus_per_actor else {})}
        self.placement = placement_group([bundle] * 4, strategy="PACK")
        ray.get(self.placement.ready())
        root = checkpoint_dir_of(config)
        critic_engine = config.engine.model_copy(update={"lr": config.critic_lr})
        inputs = config.rlhf

        def place(actor: Any, index: int, role: str) -> Any:
            strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=index)
            return actor.options(
                name=actor_name(config, role),
                num_cpus=res.cpus_per_actor,
                num_gpus=res.gpus_per_actor,
                scheduling_strategy=strategy,
            )

        self.policy = place(PolicyActor, 0, "policy").remote(
            config.model, config.engine, config.ppo, inputs.sft_checkpoint, storage.join(root, "policy")
        )
        self.critic = place(CriticActor, 1, "critic").remote(
            config.model, critic_engine, config.ppo, inputs.sft_checkpoint, storage.join(root, "critic")
        )
        self.reference = place(ReferenceActor, 2, "reference").remote(config.model, inputs.sft_checkpoint)
        self.reward = place(RewardActor, 3, "reward").remote(config.model, inputs.reward_checkpoint)

    def incarnations(self) -> list[str]:
        return [incarnation for _, incarnation in ray.get([a.identity.remote() for a in self.stateful])]

    @property
    def stateful(self) -> list[Any]:
        return [self.policy, self.critic]

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            ray.get([self.policy.load.remote(state["policy"]), self.critic.load.remote(state["critic"])])

    def close(self) -> None:
        for actor in (self.policy, self.critic, self.reference, self.reward):
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement)


def run_iteration(
    group: _Group, text: torch.Tensor, valid: torch.Tensor, kl_coef: float, seed: int, settings: PPOSettings
) -> tuple[dict[str, float], torch.Tensor]:
    """One rollout + PPO update; returns what the iteration measured and the rollout's codes."""
    codes, logprobs = ray.get(group.policy.rollout.remote(text, seed))
    ref_logprobs, scores, values = ray.get(
        [
            group.reference.logprobs.remote(text, codes),
            group.reward.score.remote(text, codes),
            group.critic.values.remote(text, codes),
        ]
    )
    mask = valid.float()[:, None].expand_as(logprobs).contiguous()
    rewards, kl = shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, settings.kl_estimator)
    advantages, returns = advantages_and_returns(rewards, values, mask, settings)
    policy_batch = {
        "text": text,
        "codes": codes,
        "old_logprobs": logprobs,
        "advantages": advantages,
        "mask": mask,
    }
    critic_batch = {"text": text, "codes": codes, "old_values": values, "returns": returns, "mask": mask}
    updates: list[dict[str, float]] = []
    for _ in range(settings.ppo_epochs):
        policy_metrics, critic_metrics = ray.get(
            [group.policy.train.remote(policy_batch), group.critic.train.remote(critic_batch)]
        )
        updates.append({**policy_metrics, **critic_metrics})
    rows = valid.bool()
    return codes, {
        "reward": float(scores[rows].mean()),
        "kl": float(kl.sum(dim=1)[rows].mean()),  # per image, summed over its codes
        "kl_coef": kl_coef,
        "explained_variance": explained_variance(values, returns, mask),
        "advantage_abs": float(masked_mean(advantages.abs(), mask)),
        **{key: sum(u[key] for u in updates) / len(updates) for key in updates[0]},
    }


def rollout_grid(dvae: Any, codes: torch.Tensor, captions: list[str], count: int) -> torch.Tensor:
    """The first ``count`` rollouts decoded, each prompt written under its image."""
    side = int(codes.shape[1] ** 0.5)
    images = dvae.decode(codes[:count].view(-1, side, side).long())
    return labelled_grid(images, captions[:count])


def _read_state(url: str) -> dict[str, Any] | None:
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def resolve_inputs(config: PPOStageConfig) -> PPOStageConfig:
    """Checkpoint folders resolved to their newest checkpoint, and the model config read from the SFT one."""
    config = with_sft(config, "rlhf")
    reward = checkpoint_or_newest(config.rlhf.reward_checkpoint)
    return config.model_copy(update={"rlhf": config.rlhf.model_copy(update={"reward_checkpoint": reward})})


def train(config: PPOStageConfig) -> dict[str, Any]:
    config = resolve_inputs(config)
    settings = config.ppo
    state_url = storage.join(checkpoint_dir_of(config), STATE_FILE)
    state = _read_state(state_url) if config.run.resume != "never" else None
    manifest = load_manifest(config.data.manifest)
    loader = open_loader(
        manifest,
        rank=0,
        world_size=1,
        batch_size=settings.prompts_per_iteration,
        seed=config.run.seed,
        tokenizer=config.data.tokenizer,
        text_len=config.data.text_len,
    )
    controller = AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
    start = 0
    if state is not None:
        loader.load_state_dict(state["loader"])
        controller.coef, start = state["kl_coef"], state["iteration"]
        log.info("ppo: resuming after iteration %d from %s", start, state_url)
    group = _Group(config)
    try:  # the group holds the placement group's resources: give them back whatever happens
        return _drive(config, group, loader, controller, state, state_url, manifest.sha256(), start)
    finally:
        group.close()


def _drive(
    config: PPOStageConfig,
    group: _Group,
    loader: Any,
    controller: AdaptiveKLController,
    state: dict[str, Any] | None,
    state_url: str,
    manifest_sha256: str,
    start: int,
) -> dict[str, Any]:
    """The iterations, from the last published state (or a fresh one saved first) to the end."""
    settings = config.ppo
    if state is None:  # the state every retry can roll back to, before the first iteration
        policy_url, critic_url = ray.get([group.policy.save.remote(), group.critic.save.remote()])
        state = {"iteration": 0, "kl_coef": controller.coef, "loader": loader.state_dict()}
        state.update(policy=policy_url, critic=critic_url)
    else:
        group.restore(state)
    tracker = Tracker(
        config.run.experiment, config.run.name, run_dir=run_dir_of(config), tags={"stage": "ppo"}
    )
    tracker.log_params(config.model_dump(mode="json"))
    tracker.set_tags(
        {
            "sft_checkpoint": config.rlhf.sft_checkpoint,
            "reward_checkpoint": config.rlhf.reward_checkpoint,
            "manifest_sha256": manifest_sha256,
        }
    )
    summary: dict[str, Any] = {"stage": "ppo", "start_iteration": start, "retries": 0, "history": []}
    dvae = (
        load_frozen_dvae(checkpoint_or_newest(config.grids.dvae_checkpoint))
        if config.grids.dvae_checkpoint
        else None
    )
    batches, status, started = iter(loader), "FAILED", time.monotonic()
    try:
        for iteration in range(start, settings.iterations):
            batch = next(batches, None)
            if batch is None:
                loader.set_epoch(loader.epoch + 1)
                batches = iter(loader)
                batch = next(batches)
            for attempt in range(RESTARTS + 1):
                before = group.incarnations()
                try:
                    codes, metrics = run_iteration(
                        group,
                        batch["text"],
                        batch["valid"],
                        controller.coef,
                        config.run.seed * 100_003 + iteration,
                        settings,
                    )
                    if group.incarnations() == before:
                        break
                    log.warning(
                        "ppo: an actor restarted during iteration %d; rolling back and retrying",
                        iteration + 1,
                    )
                except RayActorError as exc:
                    log.warning(
                        "ppo: iteration %d lost an actor (%s); rolling back and retrying", iteration + 1, exc
                    )
                    if attempt == RESTARTS:
                        raise
                summary["retries"] += 1
                group.restore(state)
            policy_url, critic_url = ray.get([group.policy.save.remote(), group.critic.save.remote()])
            controller.update(metrics["kl"], settings.prompts_per_iteration)
            state = {
                "iteration": iteration + 1,
                "kl_coef": controller.coef,
                "loader": loader.state_dict(),
                "policy": policy_url,
                "critic": critic_url,
            }
            storage.write_bytes_atomic(state_url, json.dumps(state).encode())
            tracker.log_metrics(metrics, step=iteration + 1)
            if dvae is not None and (
                (iteration + 1) % config.grids.every == 0 or iteration + 1 == settings.iterations
            ):
                grid = rollout_grid(dvae, codes, batch["caption"], config.grids.images)
                tracker.log_image_grid(grid, f"grids/iteration-{iteration + 1:05d}.png")
            tracker.set_tags({"checkpoint.latest": policy_url})
            summary["history"].append(metrics)
            rate = (iteration + 1 - start) / (time.monotonic() - started)
            log.info(
                "ppo iteration %d/%d reward %.4f kl %.4f clipfrac %.3f (%.2f it/s, ETA %.0f s)",
                iteration + 1,
                settings.iterations,
                metrics["reward"],
                metrics["kl"],
                metrics["clipfrac"],
                rate,
                (settings.iterations - iteration - 1) / rate,
            )
        status = "FINISHED"
    finally:
        summary["mlflow_run_id"] = tracker.run_id
        tracker.close(status)
    summary.update(iterations=settings.iterations, checkpoint=state["policy"], state=state_url)
    return summary

"""The PPO actor group on Ray: policy, reference, reward and critic, each in its own process.

As in OpenRLHF, the models live apart from the driver's loop: the policy and the critic each own a
DeepSpeed engine (a world of one per actor), the reference and the reward model are frozen. Ray
restarts an actor that dies (``max_restarts``); the stateless ones (reference, reward) also retry the
call that was running (``max_task_retries``), so killing one costs a retry, not the run. A stateful
actor comes back from its last checkpoint with a new ``incarnation``, which tells the driver to roll
the whole group back to that checkpoint and run the iteration again.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import ray
import torch

from trainer.checkpoint import Checkpointer, read_module_state
from trainer.engine import Engine
from trainer.models import build
from trainer.net import TORCH_DIST_ENV
from trainer.rlhf.policy import RewardModel, ValueModel, image_logprobs
from trainer.rlhf.ppo import critic_loss_fn, policy_loss_fn
from trainer.sampling import generate_codes

RESTARTS = 3


class _Worker:
    """What every actor shares: a process id for fault tests and an incarnation for restarts."""

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex

    def identity(self) -> tuple[int, str]:
        return os.getpid(), self.incarnation


def _frozen(model_config: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build(model_config, device="cpu")
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)
class ReferenceActor(_Worker):
    """The frozen SFT policy: log-probs of the codes the policy drew, for the KL penalty."""

    def __init__(self, model_config: Any, sft_checkpoint: str) -> None:
        super().__init__()
        self.model = _frozen(model_config, read_module_state(sft_checkpoint))

    @torch.no_grad()
    def logprobs(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return image_logprobs(self.model, text, codes)


@ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)
class RewardActor(_Worker):
    """Scores finished images: a trained reward model (``reward`` stage checkpoint)."""

    def __init__(self, model_config: Any, reward_checkpoint: str) -> None:
        super().__init__()
        self.model = RewardModel(model_config)
        self.model.load_state_dict(read_module_state(reward_checkpoint))
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.model(text, codes)


class _TrainedWorker(_Worker):
    """An actor that owns a DeepSpeed engine and its checkpoints (policy or critic)."""

    def __init__(self, model: torch.nn.Module, config: Any, loss_fn: Any, checkpoint_root: str) -> None:
        super().__init__()
        # Each engine is a world of one on its own free port; Ray workers inherit the environment of
        # whoever started Ray, which may hold that process's own MASTER_PORT.
        for name in TORCH_DIST_ENV:
            os.environ.pop(name, None)
        self.engine = Engine(model, config, loss_fn)
        # The driver names what to load (its last consistent state), also after Ray restarted the actor.
        self.checkpointer = Checkpointer(checkpoint_root, keep_last=2)

    def train(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        result = self.engine.train_step(batch)
        return {**result.metrics, "grad_norm": result.grad_norm or 0.0, "lr": result.lr}

    def save(self) -> str:
        return self.checkpointer.save(self.engine)

    def load(self, url: str) -> None:
        self.checkpointer.load(self.engine, url)


@ray.remote(max_restarts=RESTARTS)
class PolicyActor(_TrainedWorker):
    """The policy being optimised: draws rollouts with the KV-cache sampler and takes PPO steps."""

    def __init__(
        self, model_config: Any, engine_config: Any, settings: Any, sft_checkpoint: str, root: str
    ) -> None:
        model = build(model_config, device="cpu")
        model.load_state_dict(read_module_state(sft_checkpoint))
        self.settings = settings
        super().__init__(model, engine_config, policy_loss_fn(settings), root)

    @torch.no_grad()
    def rollout(self, text: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One image per caption: codes ``(B, N)`` and the policy's log-prob of each code."""
        module = self.engine.module
        generator = torch.Generator().manual_seed(seed)
        codes = generate_codes(module, text, self.settings.sampling, generator)
        module.eval()
        logprobs = image_logprobs(module, text, codes)
        module.train()
        return codes, logprobs


@ray.remote(max_restarts=RESTARTS)
class CriticActor(_TrainedWorker):
    """The value model, initialised from the SFT transformer with a fresh head."""

    def __init__(
        self, model_config: Any, engine_config: Any, settings: Any, sft_checkpoint: str, root: str
    ) -> None:
        model = ValueModel(model_config)
        model.load_policy_state(read_module_state(sft_checkpoint))
        super().__init__(model, engine_config, critic_loss_fn(settings), root)

    @torch.no_grad()
    def values(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        module = self.engine.module
        module.eval()
        values = module(text, codes)
        module.train()
        return values

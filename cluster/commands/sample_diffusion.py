"""``tessera sample --model diffusion``: prompts -> latent diffusion (EMA weights, DDPM/DDIM/DPM-Solver++,
classifier-free guidance) -> autoencoder decode -> image grid (PNG + MLflow).

Defaults come from the config's ``[diffusion]`` section; ``--sampler``, ``--steps``, ``--guidance`` and
``--seed`` override them.
"""

from __future__ import annotations

import argparse
import json
import os

from cluster.config import load_config


def main(args: argparse.Namespace) -> int:
    from PIL import Image

    from cluster.stage_inputs import resolve_stage_inputs
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.diffusion.inference import check_compatible, generate, load_denoiser, load_frozen_autoencoder
    from trainer.diffusion.schedule import NoiseSchedule
    from trainer.inference import resolve_checkpoint
    from trainer.stages.diffusion import DiffusionStageConfig, sample_prompts
    from trainer.stages.loop import checkpoint_dir_of
    from trainer.tracking import Tracker, image_grid

    config = resolve_stage_inputs(load_config(DiffusionStageConfig, args.config, args.overrides))
    section = config.diffusion
    sampler = args.sampler or section.sampler
    steps = args.steps or (1000 if sampler == "ddpm" else section.sample_steps)
    guidance = args.guidance if args.guidance is not None else max(section.guidance_scales)
    seed = args.seed if args.seed is not None else section.sample_seed
    checkpoint = resolve_checkpoint(args.checkpoint, checkpoint_dir_of(config))
    net = load_denoiser(checkpoint, args.device)
    autoencoder = load_frozen_autoencoder(section.autoencoder_checkpoint, args.device)
    tokenizer = load_tokenizer(config.data.tokenizer)
    check_compatible(net.config, autoencoder, tokenizer)
    prompts = args.prompt or sample_prompts(config)
    images = generate(
        net,
        autoencoder,
        tokenizer.encode_batch(prompts, net.config.text.text_len),
        NoiseSchedule(section.schedule, section.num_timesteps),
        guidance=guidance,
        sampler=sampler,
        steps=steps,
        prediction=section.prediction,
        seed=seed,
    )

    os.makedirs(args.run_dir, exist_ok=True)
    grid_path = os.path.join(args.run_dir, "samples.png")
    Image.fromarray(image_grid(images, nrow=min(8, len(prompts)))).save(grid_path)
    settings = {"sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed}
    with Tracker(config.run.experiment, f"{config.run.name}-samples", run_dir=args.run_dir) as tracker:
        tracker.log_params(
            {"checkpoint": checkpoint, "autoencoder_checkpoint": section.autoencoder_checkpoint, **settings}
        )
        tracker.log_dict({"prompts": prompts}, "samples/prompts.json")
        tracker.log_image_grid(images, "samples/grid.png", nrow=min(8, len(prompts)))
        run_id = tracker.run_id
    print(json.dumps({"grid": grid_path, "prompts": prompts, **settings, "mlflow_run_id": run_id}, indent=2))
    return 0

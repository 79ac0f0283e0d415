"""The latent diffusion models: shapes, meta-device sizing, attention through kernels.attention, text
conditioning, and a tiny UNet that memorises 8 captioned images and gives them back through DDIM."""

from __future__ import annotations

import pytest
import torch

import trainer.models.text_encoder as text_encoder
from cluster.config import load_config
from trainer.diffusion import NoiseSchedule, guided, sample
from trainer.losses.diffusion import diffusion_loss
from trainer.models import build, count_parameters
from trainer.models.autoencoder import AutoencoderConfig, KLAutoencoder
from trainer.models.dit import DiT, DiTConfig
from trainer.models.text_encoder import TextEncoderConfig
from trainer.models.unet import UNet, UNetConfig
from trainer.stages.diffusion import DiffusionStageConfig

TEXT = TextEncoderConfig(vocab_size=32, text_len=6, width=32, depth=1, heads=2)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Undo the zero-initialised output layers so every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(channels=16, channel_mult=[1, 2], attention_levels=[1], text=TEXT),
        DiTConfig(width=32, depth=2, heads=2, patch=2, text=TEXT),
    ],
    ids=["unet", "dit"],
)
def test_denoisers_start_at_zero_and_listen_to_the_text(config):
    torch.manual_seed(0)
    model = build(config, device="cpu")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    tokens = torch.randint(1, 32, (2, 6))
    assert torch.equal(model(x, t, tokens), torch.zeros(2, 4, 8, 8))  # zero-initialised outputs
    randomise(model)
    out = model(x, t, tokens)
    assert out.shape == (2, 4, 8, 8)
    other_text = model(x, t, torch.randint(1, 32, (2, 6)))
    other_time = model(x, torch.tensor([500, 500]), tokens)
    assert not torch.allclose(out, other_text) and not torch.allclose(out, other_time)
    # Changing one latent pixel changes the output far away (attention mixes the whole grid).
    poked = x.clone()
    poked[:, :, 0, 0] += 1.0
    assert not torch.allclose(model(poked, t, tokens)[:, :, -1, -1], out[:, :, -1, -1])


def test_every_attention_goes_through_kernels_attention(monkeypatch):
    calls = []
    real = text_encoder.attention

    def counting(q, k, v, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(text_encoder, "attention", counting)
    model = UNet(UNetConfig(channels=16, channel_mult=[1, 2], attention_levels=[1], text=TEXT))
    model(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randint(1, 32, (1, 6)))
    # text: 1 self-attention; level 1 (4x4 = 16 pixels): 1 down + 2 up blocks + 1 middle, each a
    # self-attention (16 keys) and a cross-attention (6 text keys).
    assert calls.count((6, 6)) == 1
    assert calls.count((16, 16)) == 4 and calls.count((16, 6)) == 4
    assert len(calls) == 9
    calls.clear()
    DiT(DiTConfig(width=32, depth=2, heads=2, text=TEXT))(
        torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randint(1, 32, (1, 6))
    )
    assert calls == [(6, 6), (16, 16), (16, 6), (16, 16), (16, 6)]


@pytest.mark.parametrize("mult, side", [([1, 2, 2], 8), ([1, 2, 2, 4], 4)])
def test_autoencoder_shapes_and_scale_factor_round_trip(mult, side):
    torch.manual_seed(0)
    model = KLAutoencoder(AutoencoderConfig(image_size=32, channels=16, channel_mult=mult))
    images = torch.rand(2, 3, 32, 32)
    output = model(images)
    assert output.reconstruction.shape == images.shape and output.mean.shape == (2, 4, side, side)
    model.scale_factor.fill_(2.5)
    latents = model.encode(images)
    torch.testing.assert_close(latents, model.posterior(images)[0] * 2.5)
    decoded = model.decode(latents)
    torch.testing.assert_close(decoded, model.decode_raw(model.posterior(images)[0]).clamp(0, 1))
    with pytest.raises(ValueError, match="4x or 8x"):
        AutoencoderConfig(channel_mult=[1, 2])


def test_sd_class_preset_builds_on_meta_at_stable_diffusion_size():
    config = load_config(DiffusionStageConfig, "configs/diffusion/sd-class.toml", ["data.manifest='unused'"])
    model = build(config.model, device="meta")
    assert next(model.parameters()).is_meta
    # Stable Diffusion 1.x's UNet has 859,520,964 parameters (diffusers' UNet2DConditionModel); ours
    # has the same layout, so the same count, plus a CLIP-L-sized text encoder beside it.
    assert count_parameters(model) - count_parameters(model.text) == 859_520_964


def test_tiny_unet_memorises_8_captioned_images_and_ddim_gives_them_back():
    """The sampler path end to end: train eps-prediction on 8 (caption, latent) pairs until memorised,
    then DDIM from fresh noise with each caption must land on that caption's image."""
    torch.manual_seed(0)
    text = TextEncoderConfig(vocab_size=16, text_len=2, width=16, depth=1, heads=2)
    config = UNetConfig(
        latent_size=4, channels=8, channel_mult=[1, 2], attention_levels=[1], groups=4, text=text
    )
    model = UNet(config)
    grid = torch.linspace(-1, 1, 4)
    ramps = torch.stack([grid.view(1, 4).expand(4, 4), grid.view(4, 1).expand(4, 4)])
    targets = torch.stack(
        [torch.cat([ramps * (1 if i % 2 else -1), torch.full((2, 4, 4), (i - 3.5) / 3.5)]) for i in range(8)]
    )
    captions = torch.stack([torch.tensor([i + 1, i // 2 + 9]) for i in range(8)])
    # v-prediction keeps the x0 estimate well conditioned at high noise, where an eps error is
    # amplified by 1/alpha (the same choice as the small preset).
    schedule = NoiseSchedule("cosine", 1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    repeats = 4
    first = last = None
    for _ in range(400):
        x0, tokens = targets.repeat(repeats, 1, 1, 1), captions.repeat(repeats, 1)
        t = torch.randint(0, 1000, (x0.shape[0],))
        noise = torch.randn_like(x0)
        target = schedule.velocity(x0, noise, t)
        loss, _ = diffusion_loss(model(schedule.add_noise(x0, noise, t), t, tokens), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert last < 0.3 * first, (first, last)
    model.eval()
    with torch.no_grad():
        context = model.text(captions)
        drawn = sample(
            guided(model.denoise, context, context[:1], 1.0),
            schedule,
            torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(5)),
            sampler="ddim",
            steps=50,
            prediction="v",
        )
    distances = torch.cdist(drawn.flatten(1), targets.flatten(1))  # (drawn, target)
    assert torch.equal(distances.argmin(1), torch.arange(8)), distances
    # And it lands near it: on average within half the mean distance between two training images.
    pairwise = torch.cdist(targets.flatten(1), targets.flatten(1))
    assert float(distances.diagonal().mean()) < 0.5 * float(pairwise.sum() / (8 * 7)), distances

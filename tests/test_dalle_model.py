"""The DALL-E transformer: per-layer masks, padding tokens, shapes, presets and the 12B count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainer.models.dalle as dalle_module
from kernels.masks import dalle_mask
from trainer.models.dalle import DalleConfig, DalleTransformer, remap_text_padding

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "dalle"


def tiny_config(**overrides) -> DalleConfig:
    fields = dict(
        text_vocab_size=30,
        text_len=5,
        image_vocab_size=12,
        image_side=3,
        depth=4,
        heads=2,
        head_dim=4,
        attention_cycle=["row", "column", "conv"],
        conv_kernel_size=3,
    )
    fields.update(overrides)
    return DalleConfig(**fields)


def random_inputs(config: DalleConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.text_vocab_size, (batch, config.text_len), generator=generator)
    text[:, -2:] = config.text_pad_id
    codes = torch.randint(0, config.image_vocab_size, (batch, config.image_len), generator=generator)
    return text, codes


def test_layer_cycle_is_documented_and_last_layer_is_full():
    config = tiny_config(depth=7, attention_cycle=["row", "column", "row", "row"])
    assert config.layer_attention() == ["row", "column", "row", "row", "row", "column", "full"]
    assert tiny_config(depth=3, last_layer_attention=None).layer_attention() == ["row", "column", "conv"]
    assert DalleConfig().layer_attention()[:5] == ["row", "column", "row", "row", "row"]


def test_each_layer_passes_its_documented_mask_to_the_kernel(monkeypatch):
    config = tiny_config()
    model = DalleTransformer(config)
    seen: list[torch.Tensor] = []

    def recording_attention(q, k, v, *, mask=None, causal=False, scale=None):
        seen.append(mask)
        return dalle_module_attention(q, k, v, mask=mask, causal=causal, scale=scale)

    dalle_module_attention = dalle_module.attention
    monkeypatch.setattr(dalle_module, "attention", recording_attention)
    text, codes = random_inputs(config)
    model(text, codes[:, :-1])
    assert model.layer_attention() == ["row", "column", "conv", "full"]
    seq = config.seq_len
    for mask, kind in zip(seen, model.layer_attention(), strict=True):
        expected = dalle_mask(config.text_len, config.image_side, kind, kernel_size=3)[:seq, :seq]
        assert torch.equal(mask.cpu(), expected), kind


@pytest.mark.parametrize("kind", ["row", "column", "conv", "full"])
def test_one_layer_output_depends_exactly_on_the_mask(kind):
    """Change one input token at a time: a one-layer model's output moves exactly where the mask lets it."""
    config = tiny_config(depth=1, attention_cycle=[kind], last_layer_attention=None)
    model = DalleTransformer(config).double().eval()
    text, codes = random_inputs(config, batch=1)
    inputs = codes[:, :-1]

    def hidden(image_inputs):
        out = model(text, image_inputs)
        return torch.cat([out.text_logits[0, :, :1], out.image_logits[0, :, :1]])  # one logit per position

    base = hidden(inputs)
    mask = dalle_mask(config.text_len, config.image_side, kind, kernel_size=3)
    for j in range(inputs.shape[1]):
        changed = inputs.clone()
        changed[0, j] = (changed[0, j] + 1) % config.image_vocab_size
        moved = (hidden(changed) - base).abs().squeeze(1) > 1e-12
        source = config.text_len + j  # sequence position of image input j
        # Output rows are sequence positions 0..seq-1 (text rows 0..T-2, then T-1.. for the image head).
        assert torch.equal(moved, mask[: config.seq_len, source]), (kind, j)


def test_per_position_padding_tokens():
    text = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    assert remap_text_padding(text, pad_id=0, vocab_size=10).tolist() == [[5, 6, 12, 13], [7, 11, 12, 13]]
    config = tiny_config()
    model = DalleTransformer(config).eval()
    short, codes = random_inputs(config, batch=1)
    longer = short.clone()
    longer[0, -2] = 3  # one more caption token where there was a pad
    a = model(short, codes[:, :-1]).image_logits
    b = model(longer, codes[:, :-1]).image_logits
    assert not torch.allclose(a, b)


def test_output_shapes_and_gradients_reach_every_parameter():
    config = tiny_config()
    model = DalleTransformer(config)
    text, codes = random_inputs(config)
    out = model(text, codes[:, :-1])
    assert out.text_logits.shape == (2, config.text_len - 1, config.text_vocab_size + config.text_len)
    assert out.image_logits.shape == (2, config.image_len, config.image_vocab_size)
    (out.text_logits.sum() + out.image_logits.square().sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_activation_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    text, codes = random_inputs(config)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = DalleTransformer(config).double()
        model.set_activation_checkpointing(enabled)
        out = model(text, codes[:, :-1])
        (out.image_logits.square().mean() + out.text_logits.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    # Recomputation replays the same float64 ops: equal up to accumulation order.
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_bad_inputs_name_the_problem():
    config = tiny_config()
    model = DalleTransformer(config)
    text, codes = random_inputs(config)
    with pytest.raises(ValueError, match="expects text_len=5"):
        model(text[:, :3], codes[:, :-1])
    with pytest.raises(ValueError, match=r"text token ids must lie in \[0, 30\)"):
        model(text + 100, codes[:, :-1])
    with pytest.raises(ValueError, match="at most image_side"):
        model(text, codes)
    with pytest.raises(ValueError, match="image codes"):
        model(text, codes[:, :-1] + 50)


def test_flops_count_sparse_masks_for_less():
    dense = DalleTransformer(tiny_config(attention_cycle=["full"]))
    sparse = DalleTransformer(tiny_config(attention_cycle=["row"], last_layer_attention="row"))
    assert sparse.flops_per_token() < dense.flops_per_token()
    weights = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    assert dense.flops_per_token() > 6 * weights * 0.5


def test_12b_preset_has_twelve_billion_parameters_on_meta():
    from cluster.config import load_config
    from trainer.models import build, count_parameters
    from trainer.stages.dalle import DalleStageConfig

    config = load_config(DalleStageConfig, PRESETS / "dalle-12b.toml")
    model = build(config.model, device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert (config.model.depth, config.model.width, config.model.text_len) == (64, 3968, 256)
    assert (config.model.image_len, config.model.image_vocab_size, config.model.text_vocab_size) == (
        1024,
        8192,
        16384,
    )
    assert abs(count_parameters(model) / 12.0e9 - 1) < 0.03


@pytest.mark.parametrize("preset", ["tiny", "small", "dalle-12b"])
def test_presets_validate_and_build_on_meta(preset):
    from cluster.config import load_config
    from trainer.models import build
    from trainer.stages.dalle import DalleStageConfig

    config = load_config(DalleStageConfig, PRESETS / f"{preset}.toml")
    assert isinstance(build(config.model, device="meta"), DalleTransformer)

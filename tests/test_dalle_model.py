"""The DALL-E transformer: per-layer masks and token order, padding, shapes, FLOPs, presets, 12B count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainer.models.dalle as dalle_module
from kernels.masks import dalle_mask
from kernels.reference import reference_attention
from trainer.models.dalle import DalleConfig, DalleTransformer, remap_text_padding
from trainer.models.moe import MoEConfig

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


def column_major_positions(text_len: int, side: int, length: int) -> list[int]:
    """Raster positions in the order a column layer attends: the text, then the image column by column."""
    image = [text_len + row * side + column for column in range(side) for row in range(side)]
    return [p for p in list(range(text_len)) + image if p < length]


def allowed(kind: str, text_len: int, side: int, query: int, key: int) -> bool:
    """The paper's rules for raster positions, one pair at a time (what ``dalle_mask`` must build)."""
    if key > query or (query < text_len <= key):
        return False
    if key < text_len or kind == "full":
        return True
    assert kind == "column", kind
    return (query - key) % side == 0


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
        if kind == "column":  # transposed image states (DALL-E Fig. 11c), so the kernel skips tiles
            order = column_major_positions(config.text_len, config.image_side, seq)
            expected = expected[order][:, order]
        assert torch.equal(mask.cpu(), expected), kind


def reference_forward(model: DalleTransformer, text: torch.Tensor, image_inputs: torch.Tensor):
    """The forward pass written out with float64 reference attention on raster-order masks."""
    cfg = model.config
    x = torch.cat([model.embed_text(text), model.embed_image(image_inputs)], dim=1)
    batch, length, width = x.shape
    for block in model.blocks:
        q, k, v = block.attn.qkv(block.norm1(x)).view(batch, length, 3, cfg.heads, -1).permute(2, 0, 3, 1, 4)
        mask = dalle_mask(
            cfg.text_len, cfg.image_side, block.attention_kind, kernel_size=cfg.conv_kernel_size
        )
        y = reference_attention(q, k, v, mask=mask[:length, :length])
        x = x + block.attn.out(y.transpose(1, 2).reshape(batch, length, width))
        x = x + block.ffn(block.norm2(x))[0]
    h = model.final_norm(x)
    return model.text_head(h[:, : cfg.text_len - 1]), model.image_head(h[:, cfg.text_len - 1 :])


@pytest.mark.parametrize("prefix", [0, 5, 15], ids=["text-only", "partial-image", "training"])
def test_column_major_layers_compute_raster_order_attention(prefix):
    """Reordering is invisible: logits and gradients equal raster-order float64 attention, for every prefix
    length (sampling without a cache passes prefixes). float64 on both sides: agreement to ~1e-15."""
    config = tiny_config(
        image_side=4, depth=3, attention_cycle=["column", "row"], last_layer_attention="column", init_std=0.3
    )
    model = DalleTransformer(config).double()
    text, codes = random_inputs(config, seed=5)
    outputs, grads = [], []
    for forward in (
        lambda: model(text, codes[:, :prefix]),
        lambda: reference_forward(model, text, codes[:, :prefix]),
    ):
        model.zero_grad()
        out = forward()
        text_logits, image_logits = (
            (out.text_logits, out.image_logits) if hasattr(out, "text_logits") else out
        )
        (text_logits.sin().sum() + image_logits.cos().sum()).backward()
        outputs.append(torch.cat([text_logits.flatten(), image_logits.flatten()]))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


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


def computed_scores(kind: str, config: DalleConfig, block: int) -> int:
    """Scores a block-sparse kernel computes for one layer: tile by tile, any allowed pair -> whole tile."""
    seq, text_len, side = config.seq_len, config.text_len, config.image_side
    order = column_major_positions(text_len, side, seq) if kind == "column" else list(range(seq))
    tiles = 0
    for first_query in range(0, seq, block):
        for first_key in range(0, seq, block):
            tiles += any(
                allowed(kind, text_len, side, order[q], order[k])
                for q in range(first_query, min(first_query + block, seq))
                for k in range(first_key, min(first_key + block, seq))
            )
    return tiles * block * block


def test_flops_count_the_tiles_the_kernel_computes():
    """Two layers (column, full) at 4x4 tiles against a hand count: 6 per weight a position passes through,
    12 * width per computed score (every non-empty tile in full, column layer in column-major order)."""
    config = tiny_config(image_side=6, depth=2, attention_cycle=["column"], last_layer_attention="full")
    model = DalleTransformer(config)
    seq, width = config.seq_len, config.width
    per_layer = (3 + 1 + 2 * config.ffn_mult) * width * width  # qkv, out, two FFN matrices (biases: no FLOPs)
    heads = width * (config.text_classes * (config.text_len - 1) + config.image_vocab_size * config.image_len)
    scores = sum(computed_scores(kind, config, block=4) for kind in ("column", "full"))
    expected = 6 * (config.depth * per_layer + heads / seq) + 12 * width * scores / seq
    assert model.flops_per_token(block_m=4, block_n=4) == pytest.approx(expected, rel=1e-12)
    assert model.flops_per_sample() == pytest.approx(model.flops_per_token() * seq, rel=1e-12)


def test_expert_flops_per_token_do_not_shrink_with_expert_parallelism():
    """Each token passes through top_k experts wherever they live: the same FLOPs at ep_size 1 and 8."""
    counts = []
    for ep_size in (1, 8):
        moe = MoEConfig(enabled=True, every=2, num_experts=8, top_k=2, ep_size=ep_size)
        config = tiny_config(depth=2, attention_cycle=["full"], moe=moe)
        with torch.device("meta"):
            model = DalleTransformer(config)
        counts.append(model.flops_per_token(block_m=4, block_n=4))
    with torch.device("meta"):
        dense = DalleTransformer(tiny_config(depth=2, attention_cycle=["full"]))
    width, hidden = config.width, config.ffn_mult * config.width
    # Layer 1 swaps its dense FFN (2 matrices) for a gate (width x experts) and top_k = 2 expert FFNs.
    expected = dense.flops_per_token(block_m=4, block_n=4) + 6 * (
        width * 8 + 2 * 2 * width * hidden - 2 * width * hidden
    )
    assert counts == pytest.approx([expected, expected], rel=1e-12)


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

"""openai's released DALL-E dVAE (PyPI ``DALL-E``, module ``dall_e``) -> a Tessera dVAE checkpoint.

openai ships ``encoder.pkl`` and ``decoder.pkl`` as whole modules pickled by ``torch.save``. Their
architecture is Tessera's dVAE (``configs/dvae/dalle.toml``: 8192 codes, 4 groups of 2 residual
blocks, 97,616,006 parameters both); only the names differ (``blocks.group_2.block_1.res_path.conv_3.w``
is ``encoder.<k>.residual.5.weight``). Both use the logit-Laplace pixel map with eps 0.1, so images in
[0, 1] give the same codes and reconstructions (``dall_e.map_pixels`` / ``unmap_pixels`` are what
``DVAE.encode`` / ``DVAE.decode`` apply inside).

Reading the pickles: by default ``torch.load(weights_only=True)`` with each ``dall_e`` class name
allowlisted to a stand-in :class:`_PickledModule` that only receives the pickled state (no ``dall_e`` code
runs, the package need not be installed) and torch's own layer classes; only tensors, containers and
those classes can be built. A file in torch's legacy (pre-1.6) format embeds module source, which
weights-only loading refuses; ``trust_pickle=True`` then unpickles it fully (``dall_e`` installed),
which runs whatever the file says: the caller names a local file it trusts, never a URL. Nothing read
from an object store is ever unpickled.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from trainer.models.dvae import DVAE, DVAEConfig, ResidualBlock

DALL_E_CLASSES = (
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
)
TORCH_LAYERS = (nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Upsample, nn.Identity)
GROUPS = 4  # dall_e's group_count: 3 pools, 8x downsampling
_BLOCK = re.compile(r"blocks\.group_1\.block_(\d+)\.")


class _PickledModule(nn.Module):
    """Receives a pickled ``dall_e`` module's state (parameters, children, attributes) and nothing else."""


def _safe_globals() -> list[Any]:
    return [*((_PickledModule, name) for name in DALL_E_CLASSES), *TORCH_LAYERS]


def _reason(exc: Exception) -> str:
    """torch's refusal without its boilerplate: the unsupported global or record it met."""
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "Please file an issue",
        "(1)",
        "(2)",
    )
    lines = [line.strip() for line in str(exc).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith(boilerplate))[:300]


def read_dall_e_state(path: str, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a pickled ``dall_e`` Encoder or Decoder in the local file ``path``."""
    if "://" in path:
        raise ValueError(f"{path}: name a local file (openai's pickles are never read from a URL)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if trust_pickle:
        import dall_e  # noqa: F401  (its classes must be importable to unpickle the module)

        module = torch.load(path, map_location="cpu", weights_only=False)
    else:
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                module = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path}: refused by weights-only loading ({_reason(exc)}). openai's files load this way "
                "unless saved in torch's legacy format; if you trust this local file, --trust-pickle "
                "unpickles it in full, running code from it (needs `pip install --no-deps DALL-E`)"
            ) from exc
    if not isinstance(module, nn.Module):
        raise ValueError(f"{path}: holds a {type(module).__name__}, not a pickled dall_e Encoder/Decoder")
    return {name: value.detach().float() for name, value in module.state_dict().items()}


def _weight(state: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"{where}: no {name} (not a dall_e Encoder/Decoder)")
    return state[name]


def infer_config(
    encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor], image_size: int = 256
) -> DVAEConfig:
    """The Tessera config of a ``dall_e`` pair, read from the weights' shapes (checked to agree)."""
    stem = _weight(encoder, "blocks.input.w", "encoder")
    head = _weight(encoder, "blocks.output.conv.w", "encoder")
    dec_in = _weight(decoder, "blocks.input.w", "decoder")
    dec_out = _weight(decoder, "blocks.output.conv.w", "decoder")
    groups = {name.split(".")[1] for name in encoder if name.startswith("blocks.group_")}
    found = {
        "encoder input channels": (stem.shape[1], 3),
        "decoder output channels": (dec_out.shape[0], 6),  # logit-Laplace (mu, log b) per RGB channel
        "encoder groups": (len(groups), GROUPS),
        "decoder vocab_size (input channels)": (dec_in.shape[1], head.shape[0]),
        "decoder hidden (last group width)": (dec_out.shape[1], stem.shape[0]),
    }
    wrong = [f"{what}: {got}, expected {want}" for what, (got, want) in found.items() if got != want]
    if wrong:
        raise ValueError("not a matching dall_e Encoder/Decoder pair: " + "; ".join(wrong))
    blocks = max(int(m.group(1)) for name in encoder if (m := _BLOCK.match(name)))
    return DVAEConfig(
        image_size=image_size,
        vocab_size=head.shape[0],
        hidden=stem.shape[0],
        blocks_per_group=blocks,
        downsample=2 ** (GROUPS - 1),
        decoder_init_channels=dec_in.shape[0],
        reconstruction="logit_laplace",
    )


def name_map(model: DVAE) -> dict[str, str]:
    """Tessera conv prefix -> ``encoder:``/``decoder:`` + the ``dall_e`` conv prefix it takes weights from."""
    per_group = model.config.blocks_per_group
    mapping: dict[str, str] = {}
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        mapping[f"{side}.0"] = f"{side}:blocks.input"
        mapping[f"{side}.{len(stack) - 1}"] = f"{side}:blocks.output.conv"
        blocks = [index for index, layer in enumerate(stack) if isinstance(layer, ResidualBlock)]
        for number, index in enumerate(blocks):
            prefix = f"{side}:blocks.group_{number // per_group + 1}.block_{number % per_group + 1}"
            block = stack[index]
            convs = [k for k, layer in enumerate(block.residual) if isinstance(layer, nn.Conv2d)]
            for position, k in enumerate(convs, start=1):
                mapping[f"{side}.{index}.residual.{k}"] = f"{prefix}.res_path.conv_{position}"
            if isinstance(block.identity, nn.Conv2d):
                mapping[f"{side}.{index}.identity"] = f"{prefix}.id_path"
    return mapping


def convert(
    encoder: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor], model: DVAE
) -> dict[str, torch.Tensor]:
    """``model``'s state dict filled from the ``dall_e`` weights; every tensor used exactly once."""
    sources = {"encoder": encoder, "decoder": decoder}
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, theirs in name_map(model).items():
        side, prefix = theirs.split(":", 1)
        for suffix, their_suffix in (("weight", "w"), ("bias", "b")):
            name = f"{prefix}.{their_suffix}"
            value = _weight(sources[side], name, side)
            expected = target[f"{ours}.{suffix}"].shape
            if value.shape != expected:
                raise ValueError(
                    f"{side} {name}: shape {tuple(value.shape)}, Tessera's {ours} has {tuple(expected)}"
                )
            state[f"{ours}.{suffix}"] = value
            used.add(f"{side}:{name}")
    unused = sorted({f"{side}:{name}" for side, weights in sources.items() for name in weights} - used)
    missing = sorted(set(target) - set(state))
    if unused or missing:
        raise ValueError(f"weights left over: {unused[:5]}; Tessera weights not filled: {missing[:5]}")
    return state


def import_openai_dvae(
    encoder_path: str, decoder_path: str, out: str, *, image_size: int = 256, trust_pickle: bool = False
) -> dict[str, Any]:
    """Read openai's pickled encoder/decoder (local files), write a Tessera dVAE checkpoint under ``out``."""
    from trainer.checkpoint import save_weights

    encoder = read_dall_e_state(encoder_path, trust_pickle=trust_pickle)
    decoder = read_dall_e_state(decoder_path, trust_pickle=trust_pickle)
    config = infer_config(encoder, decoder, image_size)
    with torch.device("meta"):  # no random init of ~100M weights that are replaced at once
        model = DVAE(config)
    model.load_state_dict(convert(encoder, decoder, model), assign=True)
    source = {
        "format": "openai-dall_e",
        "encoder": os.path.abspath(encoder_path),
        "decoder": os.path.abspath(decoder_path),
        "read": "pickle (trusted)" if trust_pickle else "weights_only",
    }
    url = save_weights(out, model, source=source)
    return {
        "checkpoint": url,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": config.model_dump(mode="json"),
        "read": source["read"],
    }

"""`tessera import openai-dvae`: openai's dall_e Encoder/Decoder (PyPI ``DALL-E``, installed --no-deps by
the Makefile) with random weights, saved as openai did (``torch.save`` of the whole module), imported,
and compared with dall_e's own forward: codes and reconstructions must be bit-identical (the same fp32
convolutions in the same order on CPU; any renaming, transposition or gain slip changes them)."""

from __future__ import annotations

import json
import os
import tomllib

import pytest
import torch
import torch.nn.functional as F
from dall_e import Decoder, Encoder, map_pixels, unmap_pixels

from cluster import cli
from trainer.checkpoint import read_model_config
from trainer.inference import checkpoint_or_newest, load_frozen_dvae
from trainer.models.dvae import DVAE, DVAEConfig
from trainer.models.openai_dvae_import import convert, infer_config, read_dall_e_state

VOCAB = 512  # dall_e's smallest allowed vocabulary and width (its validators: vocab >= 512, n_hid >= 64)
SMALL = {"n_hid": 64, "n_blk_per_group": 2, "vocab_size": VOCAB}


def random_pair(seed: int = 0) -> tuple[Encoder, Decoder]:
    """Small dall_e modules; biases random too (dall_e inits them to 0, which would hide a bias slip)."""
    torch.manual_seed(seed)
    encoder, decoder = Encoder(**SMALL), Decoder(n_init=32, **SMALL)
    with torch.no_grad():
        for module in (encoder, decoder):
            for name, parameter in module.named_parameters():
                if name.endswith(".b"):
                    parameter.normal_(0, 0.1)
    return encoder.eval(), decoder.eval()


def dall_e_decode(decoder: Decoder, codes: torch.Tensor) -> torch.Tensor:
    """dall_e's README recipe: one-hot codes -> decoder -> sigmoid of the first 3 channels -> unmap."""
    stats = decoder(F.one_hot(codes, VOCAB).permute(0, 3, 1, 2).float()).float()
    return unmap_pixels(torch.sigmoid(stats[:, :3]))


def run_import(capsys, *args: str) -> tuple[int, dict | str]:
    """Exit status and the printed result (JSON), or what went to stderr."""
    status = cli.main(["import", "openai-dvae", *args])
    captured = capsys.readouterr()
    return status, (json.loads(captured.out) if status == 0 else captured.err)


@torch.no_grad()
def test_imported_dvae_reproduces_dall_e_codes_and_reconstructions(tmp_path, capsys):
    encoder, decoder = random_pair()
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    status, result = run_import(
        capsys,
        *("--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl")),
        *("--out", str(tmp_path / "imported"), "--image-size", "32"),
    )
    assert status == 0 and result["read"] == "weights_only"
    assert result["parameters"] == sum(p.numel() for m in (encoder, decoder) for p in m.parameters())
    ours = load_frozen_dvae(result["checkpoint"])
    assert read_model_config(result["checkpoint"])["blocks_per_group"] == 2

    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits = encoder(map_pixels(images))
    # The logits themselves: a random encoder picks few distinct codes, its logits show every weight.
    assert torch.equal(ours.encoder(map_pixels(images)), logits)
    theirs = logits.argmax(dim=1)
    codes = ours.encode(images)
    assert codes.shape == (6, 4, 4) and torch.equal(codes, theirs)
    assert torch.equal(ours.decode(codes), dall_e_decode(decoder, theirs))
    # Every code through the decoder, not only those the encoder picked.
    everything = torch.arange(VOCAB).view(-1, 4, 4)[:8]
    assert torch.equal(ours.decode(everything), dall_e_decode(decoder, everything))


@torch.no_grad()
def test_import_to_an_object_store_reads_back(tmp_path, capsys, s3_ceph):
    """The checkpoint goes to real S3 (Ceph) like a trained one and loads from there (verified sha256s)."""
    encoder, decoder = random_pair(seed=5)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    out = s3_ceph.url("openai-dvae")
    status, result = run_import(
        capsys,
        *("--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl")),
        *("--out", out, "--image-size", "32"),
    )
    assert status == 0 and result["checkpoint"].startswith(out)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ours = load_frozen_dvae(checkpoint_or_newest(out))
    assert torch.equal(ours.encoder(map_pixels(images)), encoder(map_pixels(images)))


def test_full_size_matches_configs_dvae_dalle(tmp_path):
    """The released model's size (meta tensors: no memory, no forward): 97,616,006 parameters both, and
    the conversion fills the 8192-code preset exactly from openai's names and shapes."""
    meta = torch.device("meta")
    encoder, decoder = Encoder(device=meta), Decoder(device=meta)
    count = lambda module: sum(p.numel() for p in module.parameters())
    with open("configs/dvae/dalle.toml", "rb") as handle:
        preset = DVAEConfig.model_validate(tomllib.load(handle)["model"])
    with meta:
        ours = DVAE(preset)
    assert count(encoder) + count(decoder) == count(ours) == 97_616_006
    encoder_state = {name: value for name, value in encoder.state_dict().items()}
    decoder_state = {name: value for name, value in decoder.state_dict().items()}
    assert infer_config(encoder_state, decoder_state, image_size=256) == preset
    ours.load_state_dict(convert(encoder_state, decoder_state, ours), assign=True)


def test_legacy_pickles_need_trust_and_urls_are_refused(tmp_path, capsys):
    encoder, decoder = random_pair(seed=2)
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        torch.save(module, tmp_path / f"{name}.pkl", _use_new_zipfile_serialization=False)
    paths = ("--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl"))
    status, error = run_import(capsys, *paths, "--out", str(tmp_path / "refused"))
    assert status == 2 and "--trust-pickle" in error
    assert not os.path.exists(tmp_path / "refused")
    status, result = run_import(capsys, *paths, "--out", str(tmp_path / "trusted"), "--trust-pickle")
    assert status == 0 and result["read"] == "pickle (trusted)"
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            load_frozen_dvae(result["checkpoint"]).encode(images), encoder(map_pixels(images)).argmax(1)
        )
    status, error = run_import(
        capsys, "--encoder", "s3://bucket/encoder.pkl", *paths[2:], "--out", str(tmp_path / "x")
    )
    assert status == 2 and "local file" in error


class _Planted:
    """A pickle that would create a folder if anything unpickled it in full."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_hostile_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"blocks": _Planted(str(marker))}, tmp_path / "encoder.pkl")
    with pytest.raises(ValueError, match="refused by weights-only loading .*GLOBAL os.makedirs"):
        read_dall_e_state(str(tmp_path / "encoder.pkl"))
    assert not marker.exists()


def test_a_mismatched_pair_is_named(tmp_path, capsys):
    encoder, _ = random_pair()
    torch.manual_seed(3)
    other = Decoder(n_init=32, n_hid=64, n_blk_per_group=2, vocab_size=1024)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(other, tmp_path / "decoder.pkl")
    status, error = run_import(
        capsys,
        *("--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl")),
        *("--out", str(tmp_path / "out")),
    )
    assert status == 2 and "decoder vocab_size (input channels): 1024, expected 512" in error

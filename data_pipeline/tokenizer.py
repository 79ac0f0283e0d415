"""A byte-level BPE caption tokenizer trained on a dataset's own captions (``tokenizers`` library).

Byte-level means no caption is ever out of vocabulary; training on the dataset's captions means a
small vocabulary (1k for the tiny presets) still gives short sequences, which is what a DALL-E style
model with a fixed text length wants. The tokenizer file lives beside the manifest it came from.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from data_pipeline import storage
from data_pipeline.manifest import load_manifest

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # order fixes the ids: <pad> = 0
TOKENIZER_NAME = "tokenizer.json"


def iter_captions(manifest_url: str) -> Iterator[str]:
    """Every ``.txt`` member of every shard, in manifest order."""
    manifest = load_manifest(manifest_url)
    for url in manifest.shard_urls():
        with storage.open_url(url) as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".txt"):
                    yield archive.extractfile(member).read().decode("utf-8")


def build_untrained(vocab_size: int, min_frequency: int = 2) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # Lower-cased NFKC: "Red" and "red" are one concept to a caption-conditioned image model.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS)), (EOS, SPECIAL_TOKENS.index(EOS))],
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def train_tokenizer(
    manifest_url: str, *, vocab_size: int = 1024, min_frequency: int = 2, out_url: str | None = None
) -> str:
    """Train on all captions of ``manifest_url``; save ``tokenizer.json`` beside it (or at ``out_url``)."""
    tokenizer, trainer = build_untrained(vocab_size, min_frequency)
    tokenizer.train_from_iterator(iter_captions(manifest_url), trainer=trainer)
    manifest = load_manifest(manifest_url)
    out_url = out_url or storage.join(storage.parent(manifest.location), TOKENIZER_NAME)
    storage.write_bytes_atomic(out_url, tokenizer.to_str(pretty=True).encode("utf-8"))
    return out_url


class TextTokenizer:
    """Captions to fixed-length id tensors: ``<bos> ... <eos>`` then ``<pad>`` (id 0) to ``text_len``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        for token in SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) != SPECIAL_TOKENS.index(token):
                raise ValueError(
                    f"tokenizer has {token!r} at id {tokenizer.token_to_id(token)}, expected a Tessera one"
                )
        self.pad_id = SPECIAL_TOKENS.index(PAD)
        self.bos_id = SPECIAL_TOKENS.index(BOS)
        self.eos_id = SPECIAL_TOKENS.index(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode_batch(self, captions: Sequence[str], text_len: int) -> torch.Tensor:
        """``(len(captions), text_len)`` int64; long captions are cut but keep their ``<eos>``."""
        if text_len < 2:
            raise ValueError(f"text_len must leave room for <bos> and <eos>, got {text_len}")
        self._tokenizer.enable_truncation(max_length=text_len)
        self._tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=text_len)
        encodings = self._tokenizer.encode_batch(list(captions))
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long).reshape(-1, text_len)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        return self._tokenizer.decode_batch(ids.tolist(), skip_special_tokens=True)

    def to_str(self) -> str:
        return self._tokenizer.to_str()


def load_tokenizer(url: str) -> TextTokenizer:
    """From a ``tokenizer.json`` URL, or a dataset folder holding one."""
    location = url if url.endswith(".json") else storage.join(url, TOKENIZER_NAME)
    return TextTokenizer(Tokenizer.from_str(storage.read_bytes(location).decode("utf-8")))

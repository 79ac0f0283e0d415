"""Per-sample fingerprints the contamination check compares: pixels, perceptual hash, caption n-grams.

- exact: sha256 of the DECODED pixels (so two JPEG files of one image at one quality match, and
  metadata or container differences do not matter).
- pHash (``imagehash.phash``): DCT low frequencies of a greyscale image against their median; a
  re-encode or a 1-2 px shift moves few bits. Stored packed, compared by Hamming distance.
- aligned pixels: the image blurred (Gaussian, sigma = side/16) and kept as uint8; compared as the
  best cosine over integer shifts of up to side/16 px between mean-centred windows. pHash at 32 px
  is not stable under 1-2 px shifts or crops of these low-contrast scenes (measured, docs/evals.md);
  a shift search on blurred pixels is.
- caption n-grams (GPT-3, Brown et al. 2020, appendix C): the set of word 13-grams of the
  normalised caption; a caption shorter than 13 words contributes itself whole (GPT-3 shortened N for
  short examples; a whole short caption is the strictest such choice). Stored as 64-bit hashes.
- MinHash (``datasketch``) over character 5-gram shingles of the normalised caption, for captions
  that differ by a word or two (LSH at a Jaccard threshold finds them without comparing all pairs).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

import imagehash
import numpy as np
from datasketch import MinHash
from PIL import Image, ImageFilter

NGRAM = 13
SHINGLE = 5
MINHASH_SCHEME = "affine32"  # datasketch's scheme; stored signatures are only comparable within one


def normalise_text(text: str) -> str:
    """NFKC, lower case, punctuation to spaces, whitespace collapsed (GPT-3's normalisation, roughly)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def caption_ngrams(text: str, n: int = NGRAM) -> list[str]:
    """Word n-grams of the normalised text; the whole text when it has fewer than ``n`` words."""
    words = normalise_text(text).split()
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    return np.array([hash64(gram) for gram in caption_ngrams(text, n)], dtype=np.uint64)


@functools.cache
def _empty_minhash(num_perm: int, seed: int) -> MinHash:
    """Drawing the permutations is half a MinHash's cost per caption: draw them once, copy after."""
    return MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)


def minhash_signature(text: str, num_perm: int, seed: int = 1) -> np.ndarray:
    normal = normalise_text(text)
    shingles = {normal[i : i + SHINGLE] for i in range(max(1, len(normal) - SHINGLE + 1))}
    signature = _empty_minhash(num_perm, seed).copy()
    signature.update_batch([shingle.encode() for shingle in shingles])
    return signature.hashvalues.astype(np.uint64)


def pixel_digest(image: np.ndarray) -> bytes:
    """sha256 of the decoded uint8 pixels and their shape."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).digest()


def phash_bits(image: np.ndarray, hash_size: int) -> np.ndarray:
    """Packed pHash bits (``hash_size**2 / 8`` bytes)."""
    return np.packbits(imagehash.phash(Image.fromarray(image), hash_size=hash_size).hash.flatten())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed bit rows: ``(M, B)`` x ``(N, B)`` -> ``(M, N)``."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(-1, dtype=np.int32)


def blurred(image: np.ndarray) -> np.ndarray:
    """The image low-passed (sigma = side/16) as uint8: what the aligned-pixel method compares."""
    sigma = image.shape[0] / 16
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def shift_radius(side: int) -> int:
    return max(1, side // 16)


def aligned_windows(images: np.ndarray, shifted: bool) -> np.ndarray:
    """Unit-norm, mean-centred, 2x-downsampled windows of ``(N, S, S, 3)`` blurred images.

    ``shifted=False``: the central window, ``(N, D)``; ``True``: every window within the shift radius,
    ``(N, shifts, D)``. Max cosine of a query's shifted windows against a base's central windows is
    the best alignment of the two images.
    """
    side = images.shape[1]
    r = shift_radius(side)
    inner = side - 2 * r
    offsets = [(dy, dx) for dy in range(2 * r + 1) for dx in range(2 * r + 1)] if shifted else [(r, r)]
    windows = np.stack([images[:, dy : dy + inner, dx : dx + inner] for dy, dx in offsets], 1).astype(
        np.float32
    )
    half = inner // 2 * 2
    windows = windows[:, :, :half, :half].reshape(len(images), len(offsets), half // 2, 2, half // 2, 2, 3)
    flat = windows.mean((3, 5)).reshape(len(images), len(offsets), -1)
    flat -= flat.mean(-1, keepdims=True)
    flat /= np.maximum(np.linalg.norm(flat, axis=-1, keepdims=True), 1e-6)
    return flat if shifted else flat[:, 0]

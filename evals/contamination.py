"""Which eval samples overlap the training data, by which method, and how near their nearest neighbour is.

Methods (see evals/fingerprints.py): ``exact`` decoded pixels, ``phash`` within a Hamming radius,
``pixels`` best shift-aligned cosine of blurred pixels above a threshold,
``ngram13`` any shared caption 13-gram, ``minhash`` caption Jaccard above a threshold (LSH candidates,
then the signature estimate), ``features`` judge-feature cosine above a threshold (exact search,
blocked matmul). A sample's ``clean`` verdict uses ``clean_methods`` only: on a templated caption
grammar (the synthetic scenes) distinct images share captions by design, so caption methods are
reported but do not decide cleanliness there; on natural captions add them (docs/evals.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasketch import MinHashLSH
from datasketch.lean_minhash import LeanMinHash
from pydantic import BaseModel, ConfigDict, Field

from evals.fingerprints import MINHASH_SCHEME, aligned_windows, hamming
from evals.index import ShardIndex

METHODS = ("exact", "phash", "pixels", "ngram13", "minhash", "features")
BLOCK = 1024  # rows per block in the pairwise searches: bounded memory for any index size


class CheckSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phash_radius: int = Field(2, ge=0)
    pixel_threshold: float = Field(0.97, gt=0, le=1)
    minhash_threshold: float = Field(0.7, gt=0, le=1)
    feature_threshold: float = Field(0.995, gt=0, le=1)
    clean_methods: tuple[str, ...] = ("exact", "phash", "pixels")
    examples: int = Field(8, ge=0)


def nearest_hamming(query: np.ndarray, base: np.ndarray) -> np.ndarray:
    """For each query row: the smallest Hamming distance to any base row."""
    best = np.full(len(query), np.iinfo(np.int32).max, np.int32)
    for lo in range(0, len(base), BLOCK):
        distances = hamming(query, base[lo : lo + BLOCK])
        if distances.size:
            best = np.minimum(best, distances.min(1))
    return best


def nearest_cosine(query: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (L2-normalised) query row: the largest cosine to any base row, and its index.

    ``query`` may be ``(M, K, D)``: K variants per query (shifted windows), the best one counts.
    """
    variants = query if query.ndim == 3 else query[:, None, :]
    best = np.full(len(query), -np.inf, np.float32)
    where = np.zeros(len(query), np.int64)
    for lo in range(0, len(base), BLOCK):
        block = base[lo : lo + BLOCK]
        if len(block) == 0 or len(query) == 0:
            continue
        similarity = (variants @ block.T).max(1)
        arg = similarity.argmax(1)
        value = similarity[np.arange(len(query)), arg]
        better = value > best
        best[better], where[better] = value[better], arg[better] + lo
    return best, where


def ngram_overlap(train: ShardIndex, evals: ShardIndex) -> np.ndarray:
    """True where an eval caption shares any n-gram with any training caption."""
    seen = set(train.ngram_hashes.tolist())
    offsets = evals.ngram_offsets
    return np.array(
        [
            any(h in seen for h in evals.ngram_hashes[offsets[i] : offsets[i + 1]].tolist())
            for i in range(len(evals))
        ],
        dtype=bool,
    )


def minhash_matches(train: ShardIndex, evals: ShardIndex, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Eval rows with a training caption of estimated Jaccard >= threshold (LSH, then verified), and which."""
    perm = train.minhash.shape[1]
    lsh = MinHashLSH(threshold=threshold, num_perm=perm)
    for i, values in enumerate(train.minhash):
        lsh.insert(i, LeanMinHash(seed=1, hashvalues=values, scheme=MINHASH_SCHEME), check_duplication=False)
    flagged = np.zeros(len(evals), bool)
    nearest = np.full(len(evals), -1, np.int64)
    for row, values in enumerate(evals.minhash):
        candidates = lsh.query(LeanMinHash(seed=1, hashvalues=values, scheme=MINHASH_SCHEME))
        if not candidates:
            continue
        estimates = (train.minhash[candidates] == values).mean(1)
        best = int(np.argmax(estimates))
        if estimates[best] >= threshold:
            flagged[row], nearest[row] = True, candidates[best]
    return flagged, nearest


def check(train: ShardIndex, evals: ShardIndex, settings: CheckSettings) -> dict[str, Any]:
    """The report: per method flagged count and rate, the clean count, and per-sample verdicts."""
    flags: dict[str, np.ndarray] = {}
    exact_set = set(train.exact.tolist())
    flags["exact"] = np.array([digest in exact_set for digest in evals.exact.tolist()], bool)
    phash_distance = nearest_hamming(evals.phash, train.phash)
    flags["phash"] = phash_distance <= settings.phash_radius
    pixel_cosine, pixel_nearest = nearest_cosine(
        aligned_windows(evals.pixels, shifted=True), aligned_windows(train.pixels, shifted=False)
    )
    flags["pixels"] = pixel_cosine >= settings.pixel_threshold
    flags["ngram13"] = ngram_overlap(train, evals)
    flags["minhash"], _ = minhash_matches(train, evals, settings.minhash_threshold)
    has_features = train.features.shape[1] > 0 and evals.features.shape[1] > 0
    cosine, feature_nearest = (
        nearest_cosine(evals.features, train.features) if has_features else (None, pixel_nearest)
    )
    if has_features:
        flags["features"] = cosine >= settings.feature_threshold
    unknown = set(settings.clean_methods) - set(flags)
    if unknown:
        raise ValueError(f"clean_methods {sorted(unknown)} not available (methods run: {sorted(flags)})")
    dirty = np.zeros(len(evals), bool)
    for name in settings.clean_methods:
        dirty |= flags[name]
    count = len(evals)
    samples = []
    for i in range(count):
        nearest = int(feature_nearest[i])
        samples.append(
            {
                "key": str(evals.keys[i]),
                "caption": str(evals.captions[i]),
                "flagged_by": [name for name in flags if flags[name][i]],
                "clean": not bool(dirty[i]),
                "nearest_train_key": str(train.keys[nearest]) if len(train) else None,
                "nearest_train_caption": str(train.captions[nearest]) if len(train) else None,
                "phash_distance": int(phash_distance[i]) if len(train) else None,
                "pixel_cosine": float(pixel_cosine[i]) if len(train) else None,
                "feature_cosine": float(cosine[i]) if has_features else None,
            }
        )
    return {
        "methods": {
            name: {"flagged": int(flag.sum()), "rate": float(flag.mean()) if count else 0.0}
            for name, flag in flags.items()
        },
        "eval_samples": count,
        "train_samples": len(train),
        "clean_samples": int(count - dirty.sum()),
        "clean_methods": list(settings.clean_methods),
        "settings": settings.model_dump(mode="json"),
        "examples": [s for s in samples if s["flagged_by"]][: settings.examples],
        "samples": samples,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report's per-method table, for the terminal."""
    lines = [f"{'method':<10} {'flagged':>8} {'rate':>8}"]
    for name, row in report["methods"].items():
        lines.append(f"{name:<10} {row['flagged']:>8} {row['rate']:>8.2%}")
    lines.append(
        f"eval samples {report['eval_samples']}, clean {report['clean_samples']} "
        f"(not flagged by {', '.join(report['clean_methods'])})"
    )
    return "\n".join(lines)

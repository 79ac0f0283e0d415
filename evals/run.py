"""`tessera eval run`: contamination first, then metrics on the full eval set AND its clean subset.

Order: index the training and eval manifests (incremental Ray tasks), check every eval manifest
against the training one, load the judge (refused below the bar), then score (1) the eval data
itself (the judge's reference), (2) dVAE reconstructions of the eval images, (3) DALL-E samples for
the eval captions: alignment (seen / held-out, Wilson intervals), FID/KID against the real eval
images in the extractor's features, and for generated images a memorisation probe (nearest training
image in judge-feature and pixel space). Everything lands in one MLflow run: metrics, report.json,
report.html with tables and image grids, tagged with the training manifest's sha256 and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_pipeline.loader import open_loader
from data_pipeline.manifest import load_manifest
from evals.alignment import alignment
from evals.config import DalleRef, DvaeRef, EvalConfig
from evals.contamination import check, format_table
from evals.features import FeatureExtractor, as_float_images, load_module_extractor
from evals.fid import fid_from_features, kernel_distance
from evals.index import build_index, load_index
from evals.judge import ACCURACY_BAR, Judge, JudgeRefused, judge_extractor, judge_images

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    keys: list[str]
    images: torch.Tensor  # (N, 3, S, S) uint8
    captions: list[str]
    clean: np.ndarray  # (N,) bool, from the contamination check
    rejects: dict[str, int]


def read_eval_set(manifest_url: str, clean_keys: set[str], strict: bool) -> EvalSet:
    """Every decodable sample of a manifest (undecodable ones counted by reason, fatal if strict)."""
    loader = open_loader(
        manifest_url, rank=0, world_size=1, batch_size=256, seed=0, num_workers=0, strict=strict
    )
    keys, images, captions = [], [], []
    for batch in loader:
        keep = batch["valid"].bool()
        images.append(batch["image"][keep])
        keys += [k for k, ok in zip(batch["__key__"], keep.tolist()) if ok]
        captions += [c for c, ok in zip(batch["caption"], keep.tolist()) if ok]
    clean = np.array([key in clean_keys for key in keys], bool)
    return EvalSet(keys, torch.cat(images), captions, clean, dict(loader.rejects))


def contamination_reports(config: EvalConfig, judge_spec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Index every manifest (only what is new) and check each eval manifest against the training one."""
    for url in [config.data.train_manifest, *config.data.eval_manifests]:
        build_index(
            url,
            config.index,
            judge_spec=judge_spec,
            strict=config.data.strict and url != config.data.train_manifest,
        )
    train, _ = load_index(config.data.train_manifest)
    reports = {}
    for url in config.data.eval_manifests:
        evals, _ = load_index(url)
        reports[url] = check(train, evals, config.contamination)
        if reports[url]["clean_samples"] == 0:
            log.warning("%s: every eval sample overlaps the training data; its clean subset is empty", url)
        log.info(
            "contamination of %s against %s:\n%s", url, config.data.train_manifest, format_table(reports[url])
        )
    return reports


def judge_verdict_scope(card: dict[str, Any]) -> tuple[dict[str, bool], list[str]]:
    """Which optional verdicts the judge may give (small objects' shapes, digits) and why not.

    Refuses (``JudgeRefused``) a judge below the bar on any other attribute it was measured on.
    """
    accuracy = card["heldout_accuracy"]
    optional = ("shape_small", "digit")
    weak = {n: v for n, v in accuracy.items() if n not in optional and v < ACCURACY_BAR}
    if weak:
        raise JudgeRefused(
            f"judge held-out accuracy below the {ACCURACY_BAR:.0%} bar: {weak}; alignment is not reported"
        )
    scope, notes = {}, []
    for name, flag in zip(optional, ("small_shapes", "digits")):
        value = accuracy.get(name)
        scope[flag] = value is not None and value >= ACCURACY_BAR
        if not scope[flag]:
            measured = "not measured" if value is None else f"{value:.4f} < {ACCURACY_BAR}"
            notes.append(f"{name} not judged: judge held-out accuracy {measured}")
    return scope, notes


def feature_extractor(config: EvalConfig, judge: Judge) -> FeatureExtractor:
    settings = config.features
    if settings.extractor == "judge":
        return judge_extractor(judge)
    if not settings.weights:
        raise ValueError("features.weights is required for a custom extractor (nothing is downloaded)")
    return load_module_extractor(settings.extractor, settings.weights, input_size=settings.input_size)


def distribution_metrics(config: EvalConfig, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    kid_mean, kid_std = kernel_distance(
        real,
        fake,
        num_subsets=config.features.kid_subsets,
        subset_size=config.features.kid_subset_size,
        seed=config.run.seed,
    )
    return {"fid": fid_from_features(real, fake), "kid_mean": kid_mean, "kid_std": kid_std}


def memorisation(
    config: EvalConfig,
    generated: torch.Tensor,
    gen_features: np.ndarray,
    train_images: torch.Tensor,
    train_features: np.ndarray,
) -> dict[str, Any]:
    """Nearest training image of each generated one by judge-feature cosine and by RMS pixel distance."""
    settings = config.memorisation
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    cosine = unit(gen_features) @ unit(train_features).T
    nearest_feature = cosine.argmax(1)
    gen = as_float_images(generated).flatten(1).double()
    train = as_float_images(train_images).flatten(1).double()
    squared = (gen**2).sum(1, keepdim=True) + (train**2).sum(1) - 2 * gen @ train.T
    rms = (squared.clamp_min(0) / gen.shape[1]).sqrt().numpy()
    nearest_pixel = rms.argmin(1)
    best_cosine = cosine.max(1)
    best_rms = rms.min(1)
    order = np.argsort(best_rms)[: settings.pairs_shown]
    return {
        "feature_cosine_mean": float(best_cosine.mean()),
        "pixel_rms_mean": float(best_rms.mean()),
        "feature_fraction_over_threshold": float((best_cosine >= settings.feature_threshold).mean()),
        "pixel_fraction_under_threshold": float((best_rms <= settings.pixel_threshold).mean()),
        "closest_pairs": [(int(i), int(nearest_pixel[i]), float(best_rms[i])) for i in order],
        "nearest_by_feature": nearest_feature.tolist(),
    }


def score_images(
    config: EvalConfig,
    name: str,
    images: torch.Tensor,
    evalset: EvalSet,
    reference_features: np.ndarray,
    extractor: FeatureExtractor,
    judge: Judge | None,
    scope: dict[str, bool],
) -> tuple[dict[str, Any], np.ndarray]:
    """Alignment and FID/KID of ``images`` (one per eval caption), on all samples and on the clean ones."""
    features = extractor(images)
    verdicts = judge_images(judge, images) if judge is not None else None
    result: dict[str, Any] = {}
    for subset, mask in (("full", np.ones(len(images), bool)), ("clean", evalset.clean)):
        rows = np.flatnonzero(mask)
        entry: dict[str, Any] = {"samples": int(len(rows))}
        if verdicts is not None and len(rows):
            entry["alignment"] = alignment(
                [evalset.captions[i] for i in rows],
                [verdicts.scenes[i] for i in rows],
                [verdicts.digits[i] for i in rows],
                **scope,
            )
        if len(rows) >= 2:
            entry.update(distribution_metrics(config, reference_features[rows], features[rows]))
        result[subset] = entry
    log.info("%s: %s", name, {k: {m: v for m, v in e.items() if m != "alignment"} for k, e in result.items()})
    return result, features


Generator = Callable[[EvalSet], torch.Tensor]


def dvae_generator(ref: DvaeRef) -> Generator:
    """Reconstructions of the eval images (encode to codes, decode): what the dVAE keeps of a prompt."""
    from trainer.inference import checkpoint_or_newest, load_frozen_dvae

    dvae = load_frozen_dvae(checkpoint_or_newest(ref.checkpoint))

    @torch.no_grad()
    def generate(evalset: EvalSet) -> torch.Tensor:
        chunks = [as_float_images(evalset.images[i : i + 256]) for i in range(0, len(evalset.images), 256)]
        return torch.cat([dvae.decode(dvae.encode(chunk)).float().clamp(0, 1) for chunk in chunks])

    return generate


def dalle_generator(ref: DalleRef, count: int) -> Generator:
    """Images drawn for the first ``count`` eval captions."""
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.inference import checkpoint_or_newest, draw_samples, load_frozen_dvae, load_trained

    model = load_trained(checkpoint_or_newest(ref.checkpoint))
    dvae = load_frozen_dvae(checkpoint_or_newest(ref.dvae_checkpoint))
    tokenizer = load_tokenizer(ref.tokenizer)

    def generate(evalset: EvalSet) -> torch.Tensor:
        images, _ = draw_samples(model, dvae, tokenizer, evalset.captions[:count], ref.sampling)
        return images.clamp(0, 1)

    return generate


def generators_of(config: EvalConfig) -> dict[str, Generator]:
    found: dict[str, Generator] = {}
    if config.dvae is not None:
        found["dvae"] = dvae_generator(config.dvae)
    if config.dalle is not None:
        found["dalle"] = dalle_generator(config.dalle, config.samples_per_manifest)
    return found


def evaluate(
    config: EvalConfig,
    judge: Judge,
    card: dict[str, Any],
    generators: dict[str, Generator],
    train_images: torch.Tensor,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The report (JSON-able) and its images; ``generators`` map a model name to images for an eval set."""
    visuals: dict[str, dict[str, Any]] = {}
    judge_spec = {"model": judge.config.model_dump(mode="json"), "state": judge.state_dict()}
    contamination = contamination_reports(config, judge_spec)
    try:
        scope, scope_notes = judge_verdict_scope(card)
        verdict_judge: Judge | None = judge
    except JudgeRefused as refusal:
        log.error("%s", refusal)
        scope, scope_notes, verdict_judge = {}, [str(refusal)], None
    extractor = feature_extractor(config, judge)
    train_features = extractor(train_images)
    report: dict[str, Any] = {
        "contamination": contamination,
        "judge": {
            "heldout_accuracy": card["heldout_accuracy"],
            "bar": ACCURACY_BAR,
            "scope_notes": scope_notes,
        },
        "features": config.features.extractor,
        "manifests": {},
    }
    for url in config.data.eval_manifests:
        report_url = contamination[url]
        clean_keys = {s["key"] for s in report_url["samples"] if s["clean"]}
        evalset = read_eval_set(url, clean_keys, config.data.strict)
        reference = extractor(evalset.images)
        section: dict[str, Any] = {
            "rejects": evalset.rejects,
            "eval_samples": len(evalset.keys),
            "models": {},
        }
        data_scores, _ = score_images(
            config, "data", evalset.images, evalset, reference, extractor, verdict_judge, scope
        )
        section["data"] = data_scores
        for name, generate in generators.items():
            images = generate(evalset)
            subset = _first(evalset, len(images))
            scores, features = score_images(
                config, name, images, subset, reference[: len(images)], extractor, verdict_judge, scope
            )
            probe = memorisation(config, images, features, train_images, train_features)
            scores["memorisation"] = probe
            section["models"][name] = scores
            pairs = [(images[g], train_images[t]) for g, t, _ in probe["closest_pairs"]]
            visuals[f"{_short(url)}/{name}"] = {
                "reference": subset.images,
                "generated": images,
                "captions": subset.captions,
                "closest_pairs": torch.stack([as_float_images(torch.stack(p)) for p in pairs])
                if pairs
                else None,
            }
        report["manifests"][url] = section
    return report, visuals


def _short(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json") or "eval"


def _first(evalset: EvalSet, count: int) -> EvalSet:
    return EvalSet(
        evalset.keys[:count],
        evalset.images[:count],
        evalset.captions[:count],
        evalset.clean[:count],
        evalset.rejects,
    )


def read_train_images(url: str) -> torch.Tensor:
    return read_eval_set(url, set(), strict=False).images


def training_lineage(url: str) -> dict[str, str]:
    manifest = load_manifest(url)
    return {"train_manifest": manifest.location or url, "train_manifest_sha256": manifest.sha256()}

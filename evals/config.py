"""``configs/eval/*.toml``: what `tessera eval run` evaluates, against which data, with which judge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from evals.contamination import CheckSettings
from evals.index import IndexSettings
from trainer.sampling import SamplingConfig


class EvalRunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "eval"
    experiment: str = "tessera-eval"
    seed: int = 0


class EvalData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_manifest: str  # what the models under test were trained on
    eval_manifests: list[str] = Field(min_length=1)  # e.g. a seen-combination set and a held-out one
    strict: bool = False  # fail on the first undecodable eval sample instead of counting it


class JudgeRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str = "configs/judge/tiny.toml"
    checkpoint: str  # a judge checkpoint, or its run's checkpoint folder (the newest one)


class FeatureSettings(BaseModel):
    """FID/KID features: the judge's (default), or a ``module:factory`` with a local weights file."""

    model_config = ConfigDict(extra="forbid")

    extractor: str = "judge"
    weights: str | None = None
    input_size: int = Field(299, ge=8)
    kid_subsets: int = Field(50, ge=1)
    kid_subset_size: int = Field(1000, ge=2)


class DvaeRef(BaseModel):
    """A dVAE checkpoint, or a run's checkpoint folder (its newest checkpoint)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str


class DalleRef(BaseModel):
    """A DALL-E checkpoint (or run folder) with the dVAE and tokenizer it was trained with."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    dvae_checkpoint: str
    tokenizer: str
    sampling: SamplingConfig = SamplingConfig()


class MemorisationSettings(BaseModel):
    """Carlini et al. 2023-style probe of generated images against the training set."""

    model_config = ConfigDict(extra="forbid")

    feature_threshold: float = Field(0.995, gt=0, le=1)  # judge-feature cosine at or above: "memorised"
    pixel_threshold: float = Field(0.05, gt=0)  # RMS pixel distance (0..1 scale) at or below
    pairs_shown: int = Field(8, ge=0)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: EvalRunSection = EvalRunSection()
    data: EvalData
    judge: JudgeRef
    index: IndexSettings = IndexSettings()
    contamination: CheckSettings = CheckSettings()
    features: FeatureSettings = FeatureSettings()
    dvae: DvaeRef | None = None
    dalle: DalleRef | None = None
    samples_per_manifest: int = Field(64, ge=1)  # eval captions the DALL-E model draws images for
    memorisation: MemorisationSettings = MemorisationSettings()

"""Typed cttrain configuration: the `data`, `model`, `augment`, `loss`, `training` and
`evaluation` sections of the experiment YAML (machinery shared with ctprep.config).

Resolution order: dataclass defaults < YAML < `--set section.key=value` < explicit CLI flags.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctprep.config import (
    ConfigError,
    FoldsConfig,
    PreprocessConfig,
    apply_overrides,
    build,
    read_yaml,
    to_dict,
)


@dataclass
class DataConfig:
    cache: str = "data/cache/ctrate.zarr"  # the ctprep store
    slices: int = 32             # K slices per volume fed to the 2D backbone
    slice_stride: int = 2        # training: K slices from a random window with this stride
    batch_size: int = 4          # volumes per step
    num_workers: int = 4         # DataLoader worker processes (0 = in the main process)
    prefetch: int = 2            # batches prefetched per worker
    pin_memory: bool = True      # only takes effect on CUDA
    weighted_sampling: bool = False  # sample volumes by their rarest positive label
    channels: list[str] = field(default_factory=list)  # window names to use; [] = all in store


@dataclass
class ModelConfig:
    backbone: str = "resnet50"   # tiny | resnet18/34/50/101 | efficientnet_b0..b3 | convnext_tiny | ...
    pretrained: bool = False     # ImageNet weights from torchvision (needs them in the torch cache)
    attention: str = "cbam"      # none | se | cbam, inserted after backbone stages
    attention_reduction: int = 16
    global_pool: str = "avg"     # in-slice pooling of backbone maps: avg | max | avgmax | catavgmax
    multiscale: bool = False     # concatenate the pooled features of several stages (multiscale_stages)
    multiscale_stages: list[int] = field(default_factory=lambda: [2, 3, 4])  # 1-based; the last is always in
    histogram_bins: int = 0      # > 0: per-slice intensity histograms (bins per window) beside the CNN features
    floor_prior: bool = False    # add the floor's logits (fitted per fold) to the output; the CNN learns the rest
    pooling: str = "attention"   # slice pooling: attention (gated attention-MIL) | mean | max | meanmax
    attention_hidden: int = 128  # hidden size of the attention-pooling MLP
    head_norm: str = "batch"     # norm before the head's linear layer: batch | layer | none
    dropout: float = 0.3         # head dropout at the end of the dropout schedule
    dropout_start: float = 0.0   # head dropout at epoch 0 (linear ramp over dropout_warmup_epochs)
    dropout_warmup_epochs: int = 0
    tiny_width: int = 32         # channels of the first stage of the built-in `tiny` CNN
    norm: str = "batch"          # norm layers of the built-in tiny/tiny3d CNNs: batch | group
    channels_last: bool = True   # memory format on CUDA
    compile: bool = False        # torch.compile on CUDA


@dataclass
class AugmentConfig:
    enabled: bool = True
    backend: str = "torch"       # torch (on the batch, on the device) | albumentations (CPU workers)
    p_affine: float = 0.8
    rotate_deg: float = 10.0
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    translate: float = 0.05      # fraction of the image size
    hflip: float = 0.0           # left-right flip probability (off: laterality can matter)
    p_elastic: float = 0.2
    elastic_alpha: float = 0.03  # displacement amplitude, fraction of the image size
    elastic_grid: int = 4        # control points per side of the coarse displacement grid
    p_intensity: float = 0.5
    brightness: float = 0.1      # additive, fraction of the range
    contrast: float = 0.1        # multiplicative, +/- fraction
    gamma: list[float] = field(default_factory=lambda: [0.9, 1.1])
    p_noise: float = 0.2
    noise_std: float = 0.02
    p_blur: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.3, 1.0])
    mixup_alpha: float = 0.0     # > 0 enables MixUp with lambda ~ Beta(alpha, alpha)
    mixup_p: float = 0.5
    cutmix_alpha: float = 0.0    # > 0 enables CutMix (applied instead of MixUp with prob. 0.5)


@dataclass
class LossConfig:
    name: str = "focal"          # focal | asl | bce
    focal_alpha: float = 0.25    # < 0 disables the alpha balance
    focal_gamma: float = 2.0
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    class_weights: bool = False  # bce: positive weights from label frequencies
    label_smoothing: float = 0.0


@dataclass
class TrainingConfig:
    epochs: int = 30
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    restart_epochs: int = 10     # cosine warm-restart period T_0 in epochs
    restart_mult: int = 1        # T_mult
    min_lr: float = 1e-6
    amp: str = "auto"            # auto (bf16 on CUDA if supported, else fp16) | bf16 | fp16 | off
    grad_clip: float = 1.0       # max grad norm, 0 disables
    accumulate: int = 1          # gradient accumulation steps
    precise_bn: bool = False     # before each validation, BatchNorm statistics averaged over all training rows
    ema: float = 0.0             # EMA decay of weights, 0 disables (e.g. 0.999)
    early_stopping: int = 0      # patience in epochs on val macro AUROC, 0 disables
    seed: int = 42
    device: str = "auto"         # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    ddp_backend: str = "auto"    # torchrun: auto (nccl on CUDA, gloo on CPU) | nccl | gloo (ranks may share a GPU)
    deterministic: bool = True   # exact resume; GPU configs set false for speed (cuDNN benchmark)
    val_every: int = 1
    log_every: int = 10          # steps between progress updates


@dataclass
class EvaluationConfig:
    threshold: float = 0.5       # the challenge's fixed threshold
    tune_thresholds: str = "f1"  # f1 | youden | crg | none (tuned on out-of-fold predictions)
    tta_flip: bool = False       # predict: average with a left-right flipped copy
    checkpoint: str = "best_auroc"  # best_auroc | best_f1 | last, used by predict
    # which validation of a fold is its out-of-fold result (fold metrics, oof_predictions.csv):
    # last = the final epoch's (an honest estimate); best = the epoch of highest validation AUROC,
    # chosen on the very labels it is scored on (optimistic: +0.047 fold-mean on p6, BENCHMARKS §7)
    oof_epoch: str = "last"


@dataclass
class ExperimentConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "augment.backend": ("torch", "albumentations"),
    "model.attention": ("none", "se", "cbam"),
    "model.pooling": ("attention", "mean", "max", "meanmax"),
    "model.global_pool": ("avg", "max", "avgmax", "catavgmax"),
    "model.head_norm": ("batch", "layer", "none"),
    "model.norm": ("batch", "group"),
    "loss.name": ("focal", "asl", "bce"),
    "training.amp": ("auto", "bf16", "fp16", "off"),
    "training.ddp_backend": ("auto", "nccl", "gloo"),
    "evaluation.tune_thresholds": ("f1", "youden", "crg", "none"),
    "evaluation.checkpoint": ("best_auroc", "best_f1", "last"),
    "evaluation.oof_epoch": ("last", "best"),
}


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Range and choice checks a dataclass cannot express; ConfigError names the key."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{dotted} must be one of {', '.join(choices)}; got '{value}'")
    positive = {
        "data.slices": cfg.data.slices, "data.slice_stride": cfg.data.slice_stride,
        "data.batch_size": cfg.data.batch_size, "training.epochs": cfg.training.epochs,
        "training.accumulate": cfg.training.accumulate, "training.restart_epochs": cfg.training.restart_epochs,
        "training.val_every": cfg.training.val_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.data.num_workers < 0:
        raise ConfigError("data.num_workers must be >= 0")
    if not 0.0 <= cfg.training.ema < 1.0:
        raise ConfigError("training.ema must be in [0, 1)")
    if not 0.0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError("loss.label_smoothing must be in [0, 0.5)")
    for key in ("dropout", "dropout_start"):
        if not 0.0 <= getattr(cfg.model, key) < 1.0:
            raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(cfg.model, key)}")
    if cfg.model.histogram_bins < 0 or cfg.model.histogram_bins == 1:
        raise ConfigError(f"model.histogram_bins must be 0 (off) or >= 2, got {cfg.model.histogram_bins}")
    if cfg.model.attention_reduction < 1:
        raise ConfigError("model.attention_reduction must be >= 1")
    if cfg.training.lr <= 0:
        raise ConfigError("training.lr must be > 0")
    return cfg


def load_config(config: str | Path | None = None, overrides: Iterable[str] = (),
                flags: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults < YAML file < `--set` overrides < explicit CLI flags (`{"data.cache": ...}`)."""
    raw = read_yaml(config) if config is not None else {}
    raw = apply_overrides(raw, overrides)
    raw = apply_overrides(raw, [f"{k}={_yaml_scalar(v)}" for k, v in (flags or {}).items() if v is not None])
    # `storage` says how to reach the store, not what the experiment is, and may hold credentials:
    # ctprep.remote.load_storage reads it; the run's config (and so RUN_DIR/config.yaml) never holds it.
    raw.pop("storage", None)
    try:
        cfg = build(ExperimentConfig, raw, "config")
    except ConfigError as exc:
        msg = str(exc).replace("'config.", "'")
        raise ConfigError(f"{config}: {msg}" if config is not None else msg) from None
    return validate(cfg)


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    import yaml

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


__all__ = [
    "AugmentConfig", "ConfigError", "DataConfig", "EvaluationConfig", "ExperimentConfig",
    "LossConfig", "ModelConfig", "TrainingConfig", "load_config", "save_config", "validate",
]

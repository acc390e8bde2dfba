"""Typed experiment configuration shared by both stages.

One YAML file describes an experiment in sections: `preprocess` and `folds` (read by ctprep) and
`data`, `model`, `augment`, `loss`, `training`, `evaluation` (read by cttrain). Each section
becomes a dataclass. Values resolve in this order: dataclass defaults, the YAML file,
`--set section.key=value` overrides, then explicit CLI flags. An unknown section or key is an
error that names it and the nearest valid name. YAML is only ever read with `yaml.safe_load`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

# `storage` (ctprep.remote.StorageConfig) says how to reach a remote store; it is read by both stages
# and never saved into a run directory (it may hold credentials).
SECTIONS: tuple[str, ...] = (
    "preprocess", "folds", "data", "model", "augment", "loss", "training", "evaluation", "storage",
)


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and key."""


T = TypeVar("T")


@dataclass
class Window:
    """One intensity window, mapped to uint8 [0, 255] over [center - width/2, center + width/2]."""

    name: str
    center: float
    width: float


def _default_windows() -> list[Window]:
    return [
        Window("lung", -600.0, 1500.0),         # -1350 .. 150 HU: parenchyma, airways, emphysema
        Window("mediastinum", 40.0, 400.0),     # -160 .. 240 HU: heart, vessels, nodes, fluid
        Window("wide", -300.0, 1400.0),         # -1000 .. 400 HU: the seed pipeline's window
    ]


@dataclass
class PreprocessConfig:
    """How raw CT becomes cached uint8 slices (ctprep build-cache). Changing any field changes
    the store fingerprint: an existing store built with other values is refused."""

    spacing: list[float] = field(default_factory=lambda: [3.0, 1.4, 1.4])  # (z, y, x) mm
    shape: list[int] = field(default_factory=lambda: [96, 256, 256])     # (D, H, W) voxels
    windows: list[Window] = field(default_factory=_default_windows)
    clahe_clip_limit: float = 2.0    # OpenCV CLAHE clip limit; 0 disables CLAHE
    clahe_tiles: int = 8             # CLAHE tile grid is tiles x tiles per slice
    hu_rule: str = "auto"            # auto | raw | hu: CT-RATE v1 (raw) / v2 (HU) handling
    air_hu: float = -1024.0          # values below this (DICOM padding -2048, -3024) become air
    crop_body: bool = True           # crop to the body bounding box before crop/pad
    body_threshold_hu: float = -500.0
    mask_outside_body: bool = False  # every window 0 outside the patient (per-slice body mask)
    orientation: str = "LPS"         # every volume is reoriented to this before resampling
    chunk_slices: int = 4            # slices per zarr chunk (one shard holds a whole volume)
    # Measured on a real thorax at the default shape (BENCHMARKS.md): CLAHE-enhanced slices
    # compress only ~1.3x whatever the codec, and zstd level 1 writes ~4x faster than blosc-zstd
    # level 3 at nearly the same ratio, with fast partial reads. The write cost matters because
    # build-cache must stay close to the bare decode time.
    compressor: str = "zstd"         # zstd | blosc-zstd | blosc-lz4 | none
    compression_level: int = 1


@dataclass
class FoldsConfig:
    """Patient-grouped multi-label iterative stratification (ctprep make-folds)."""

    k: int = 5
    seed: int = 42


# ---------------------------------------------------------------------------- generic machinery


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nearest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, with an error that names `where`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, bool):
            # YAML 1.1 reads off/no/false (and on/yes/true) as booleans; for a string key the user
            # almost always meant the word (`training.amp: off`).
            return "on" if value else "off"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[T], values: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping; unknown keys raise ConfigError naming the key."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = _resolve_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'{_nearest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read an experiment YAML with `yaml.safe_load` (python tags are refused)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a safe YAML config ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{path}: unknown section '{key}'{_nearest(str(key), SECTIONS)}")
    return data


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value), the value parsed as a YAML scalar/list."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override '{text}': unknown section '{section}'{_nearest(section, SECTIONS)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of the raw section mapping with `section.key=value` overrides applied.

    Nested keys use more dots (`augment.affine.p=0.5`)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        node = out.setdefault(section, {})
        if node is None:
            node = out[section] = {}
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass (or nested structure) -> plain YAML/JSON-serialisable data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_section(cls: type[T], section: str, config: str | Path | None = None,
                 overrides: typing.Iterable[str] = ()) -> T:
    """Build one section's dataclass from an optional YAML file plus overrides.

    The whole file is validated at section level (unknown sections are an error) but only this
    section's keys are checked here; each stage checks its own sections."""
    raw = read_yaml(config) if config is not None else {}
    raw = apply_overrides(raw, [o for o in overrides if o.split(".", 1)[0] == section])
    where = f"{config}: {section}" if config is not None else section
    try:
        return build(cls, raw.get(section), section)
    except ConfigError as exc:
        raise ConfigError(f"{where.split(':')[0]}: {exc}" if config is not None else str(exc)) from None


def validate_preprocess(cfg: PreprocessConfig) -> PreprocessConfig:
    """Check value ranges a dataclass cannot express; raise ConfigError naming the key."""
    if len(cfg.spacing) != 3 or any(s <= 0 for s in cfg.spacing):
        raise ConfigError("preprocess.spacing must be three positive numbers (z, y, x) in mm")
    if len(cfg.shape) != 3 or any(s < 1 for s in cfg.shape):
        raise ConfigError("preprocess.shape must be three positive integers (D, H, W)")
    if not cfg.windows:
        raise ConfigError("preprocess.windows must list at least one window")
    names = [w.name for w in cfg.windows]
    if len(set(names)) != len(names):
        raise ConfigError(f"preprocess.windows: duplicate window names {names}")
    if any(w.width <= 0 for w in cfg.windows):
        raise ConfigError("preprocess.windows: every width must be positive")
    if cfg.hu_rule not in ("auto", "raw", "hu"):
        raise ConfigError(f"preprocess.hu_rule must be auto, raw or hu, got '{cfg.hu_rule}'")
    if cfg.compressor not in ("blosc-zstd", "blosc-lz4", "zstd", "none"):
        raise ConfigError(f"preprocess.compressor must be blosc-zstd, blosc-lz4, zstd or none, got '{cfg.compressor}'")
    if cfg.chunk_slices < 1:
        raise ConfigError("preprocess.chunk_slices must be >= 1")
    if cfg.clahe_clip_limit < 0 or cfg.clahe_tiles < 1:
        raise ConfigError("preprocess.clahe_clip_limit must be >= 0 and clahe_tiles >= 1")
    if len(cfg.orientation) != 3:
        raise ConfigError(f"preprocess.orientation must be a 3-letter code like LPS, got '{cfg.orientation}'")
    return cfg


def load_preprocess(config: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> PreprocessConfig:
    return validate_preprocess(load_section(PreprocessConfig, "preprocess", config, overrides))


def load_folds(config: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> FoldsConfig:
    cfg = load_section(FoldsConfig, "folds", config, overrides)
    if cfg.k < 2:
        raise ConfigError("folds.k must be >= 2")
    return cfg

from pathlib import Path

import pytest

from ctprep.config import ConfigError, load_folds, load_preprocess, read_yaml
from cttrain.config import load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo", "default", "ctrate"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert len(cfg.preprocess.shape) == 3
    assert load_preprocess(CONFIGS / f"{name}.yaml") == cfg.preprocess


def test_demo_config_is_cpu_and_has_no_pretrained_weights():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.model.backbone == "tiny" and cfg.model.pretrained is False
    assert cfg.training.device == "cpu"


def test_unknown_key_names_key_and_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbon: resnet18\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"model\.backbon.*did you mean 'backbone'"):
        load_config(p)


def test_unknown_section_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainin:\n  epochs: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown section 'trainin'.*training"):
        load_preprocess(p)


def test_resolution_order_defaults_yaml_set_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  epochs: 3\n  lr: 0.1\ndata:\n  cache: a.zarr\n", encoding="utf-8")
    cfg = load_config(p, overrides=["training.epochs=5", "data.cache=b.zarr"], flags={"data.cache": "c.zarr"})
    assert cfg.training.epochs == 5          # --set beats YAML
    assert cfg.training.lr == 0.1            # YAML beats default
    assert cfg.data.cache == "c.zarr"        # explicit flag beats --set
    assert cfg.training.warmup_epochs == 1   # default


def test_type_errors_name_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  epochs: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(p)
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config(None, overrides=["model.pooling=median"])


def test_yaml_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"training: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a safe YAML"):
        read_yaml(p)
    assert not marker.exists()


def test_preprocess_validation(tmp_path):
    with pytest.raises(ConfigError, match="preprocess.spacing"):
        load_preprocess(None, ["preprocess.spacing=[1, 1]"])
    with pytest.raises(ConfigError, match="hu_rule"):
        load_preprocess(None, ["preprocess.hu_rule=maybe"])
    with pytest.raises(ConfigError, match="folds.k"):
        load_folds(None, ["folds.k=1"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "default.yaml", overrides=["training.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_yaml_booleans_for_string_keys_mean_the_word():
    assert load_config(None, overrides=["training.amp=off"]).training.amp == "off"
    with pytest.raises(ConfigError, match="training.amp"):
        load_config(None, overrides=["training.amp=yes"])

"""Config loading: files with defaults, overrides, and errors that name the key."""
import pytest

from engine.config import ConfigError, load_config


def test_file_defaults_and_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("defaults: [models/vim_small.yaml]\noptim:\n  blr: 5e-4\ndata:\n  batch_size: 32\n")
    cfg = load_config(cfg_file, ["data.batch_size=8", "model.depth=4", "optim.betas=[0.9, 0.98]", "train.resume=none"])
    assert cfg.model.name == "vim_small_patch16_224"
    assert cfg.optim.blr == 5e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.data.batch_size == 8
    assert cfg.model.kwargs() == {"depth": 4}
    assert cfg.optim.betas == [0.9, 0.98]
    assert cfg.train.resume == "none"


@pytest.mark.parametrize("override, fragment", [
    ("optim.blrr=1", "unknown config key 'optim.blrr'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("model.depth=deep", "config key 'model.depth': expected int"),
    ("train.epochs=1.5", "config key 'train.epochs': expected int"),
    ("data.resampled=3", "config key 'data.resampled': expected bool"),
    ("optim.betas=0.9", "config key 'optim.betas': expected a list"),
    ("train=3", "config key 'train': expected a mapping"),
    ("no_equals_sign", "is not of the form"),
])
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  nmae: vim_tiny_patch16_224\n")
    with pytest.raises(ConfigError, match="model.nmae"):
        load_config(typo)


def test_every_shipped_config_loads():
    from engine.config import CONFIG_ROOT
    files = [p for p in CONFIG_ROOT.rglob("*.yaml")]
    assert files
    for path in files:
        load_config(path)

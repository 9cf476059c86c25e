from pathlib import Path

import pytest

from jobs import config
from jobs.config import ConfigError


def test_default_config_is_the_embedded_default():
    cfg = config.load()
    assert cfg.models == {
        "image": ("shapes-clip",),
        "audio": ("whisper-tiny.en",),
        "text": ("minilm-l6", "shapes-clip"),
    }
    assert cfg.whisper_mode == "trimmed" and cfg.dtype == "float32" and cfg.ray.address is None


def test_file_and_overrides_merge_over_defaults(tmp_path: Path):
    f = tmp_path / "job.yaml"
    f.write_text("models:\n  image: [clip-b32]\nbatch_size:\n  image: 8\nray:\n  address: auto\n")
    cfg = config.load(f, {"actors": 2})
    assert cfg.models == {"image": ("clip-b32",)}  # a file's models replace the defaults whole
    assert cfg.batch_size.image == 8 and cfg.batch_size.text == 256
    assert cfg.ray.address == "auto" and cfg.actors == 2


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("modles: {}", "modles: unknown key"),
        ("batch_size:\n  imag: 3", "batch_size.imag: unknown key"),
        ("actors: two", "actors: expected int"),
        ("actors: true", "actors: expected int"),
        ("models:\n  video: [x]", "models.video: unknown modality"),
        ("models:\n  image: 3", "models.image: expected a list"),
        ("dtype: float64", "dtype: must be one of"),
        ("ray: auto", "ray: expected a mapping"),
        ("[1, 2]", "must be a mapping"),
        ("a: [", "not valid YAML"),
        ("batch_size:\n  text: 0", "batch_size.text: must be at least 1, not 0"),
        ("limits:\n  audio_seconds: 0", "limits.audio_seconds: must be positive"),
        ("limits:\n  text_bytes: -1", "limits.text_bytes: must be positive"),
        ("limits:\n  audio_seconds: long", "limits.audio_seconds: expected float"),
        ("commit_every: 0", "commit_every: must be at least 1"),
        ("threads_per_actor: -1", "threads_per_actor: must be at least 0"),
        ("threads_per_actor: 100000", "threads_per_actor: must be at most 1024"),  # hung the actor's first matmul
        ("format: csv", "format: must be one of auto, media, parquet"),
        ("models:\n  text: [minilm-l6, minilm-l6]", "models.text: minilm-l6 is named twice"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        config.load(f)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load("/no/such.yaml")


def test_model_flags():
    assert config.parse_model_flags(["image=a", "text=b, c"]) == {"image": ("a",), "text": ("b", "c")}
    for bad in ("image", "video=x", "text="):
        with pytest.raises(ConfigError, match="--model"):
            config.parse_model_flags([bad])

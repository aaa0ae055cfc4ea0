from pathlib import Path

import pytest
from pydantic import ValidationError

from clipscan.config import BiasConfig, ConfigError, DafConfig, TcacConfig, load_config
from tests.conftest import ROOT

GOOD = """
data:
  path: corpus/manifest.parquet
models:
  probe: open_clip:tiny-clip
  reference: hf:tiny-dinov2
output: runs/x
knn:
  k: 5
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return str(p)


def test_loads_and_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(DafConfig, write(tmp_path, GOOD))
    assert cfg.knn.k == 5 and cfg.data.caption == "longest" and cfg.mining.pair_probe_min == 0.95
    with pytest.raises(ValidationError, match="frozen"):
        cfg.knn.k = 3  # type: ignore[misc]


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    cfg = load_config(DafConfig, write(tmp_path, GOOD), ["knn.k=20", "output=/y", "data.path=007", "mining.pair_probe_min=0.9"])
    assert cfg.knn.k == 20 and cfg.output == "/y" and cfg.data.path == "007"
    assert cfg.mining.pair_probe_min == 0.9


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "  kk: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(DafConfig, path)
    assert "knn.kk" in str(e.value) and path in str(e.value) and "allowed here" in str(e.value)


def test_unknown_override_and_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="unknown key 'knn.nope'"):
        load_config(DafConfig, path, ["knn.nope=1"])
    with pytest.raises(ConfigError, match="knn.k"):
        load_config(DafConfig, path, ["knn.k=ten"])
    with pytest.raises(ConfigError, match="data.format"):
        load_config(DafConfig, path, ["data.format=tiff"])


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing key 'output'"):
        load_config(DafConfig, write(tmp_path, GOOD.replace("output: runs/x\n", "")))


def test_section_differs_by_job(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mining"):
        load_config(TcacConfig, write(tmp_path, GOOD + "mining:\n  cases: 3\n"))


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    kinds = {"daf": DafConfig, "tcac": TcacConfig, "bias": BiasConfig}
    found = 0
    for path in sorted(root.glob("*.yaml")):
        cls = kinds[path.stem.split("-")[0]]
        load_config(cls, str(path))
        found += 1
    assert found >= 2


def test_attributes_section_and_demo_config() -> None:
    demo = load_config(DafConfig, str(ROOT / "configs" / "daf-demo.yaml"))
    assert demo.attributes.planted == "colour" and demo.attributes.control == "rank_matched"
    assert demo.models.probe == "py:clipscan.models.planted:blind_colour" and demo.data.generate_max_objects == 3
    assert TcacConfig.model_validate({"data": {"path": "x"}, "models": {"probe": "p"}, "output": "o"}).attributes.enabled
    with pytest.raises(ConfigError, match="attributes.control"):
        load_config(DafConfig, str(ROOT / "configs" / "daf-demo.yaml"), ["attributes.control=best"])
    with pytest.raises(ConfigError, match="unknown key 'attributes.lexicon'"):
        load_config(DafConfig, str(ROOT / "configs" / "daf-demo.yaml"), ["attributes.lexicon=x"])
def test_repeated_override_is_refused_with_the_brace_hint(tmp_path: Path) -> None:
    # what bash makes of an unquoted data.path=shard-{00000..00002}.tar
    expanded = [f"data.path=shard-{i:05d}.tar" for i in range(3)]
    with pytest.raises(ConfigError, match="'data.path' is given more than once") as err:
        load_config(DafConfig, write(tmp_path, GOOD), expanded)
    assert "quote it" in str(err.value) and "shard-00000.tar" in str(err.value)
    with pytest.raises(ConfigError, match="'knn.k' is given more than once"):
        load_config(DafConfig, write(tmp_path, GOOD), ["knn.k=3", "knn.k=4"])


def test_repeated_key_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'k' is given twice") as err:
        load_config(DafConfig, write(tmp_path, GOOD + "  k: 7\n"))
    assert "job.yaml" in str(err.value)


def test_decoder_limits_and_plugins(tmp_path: Path) -> None:
    cfg = load_config(DafConfig, write(tmp_path, GOOD),
                      ["data.image_plugins=[pillow_heif:register_heif_opener]", "data.decode_memory_mb=null"])
    assert cfg.data.image_plugins == ["pillow_heif:register_heif_opener"] and cfg.data.decode_memory_mb is None
    assert cfg.data.decode_timeout_s == 60.0

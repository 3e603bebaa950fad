import subprocess
import sys

import pytest
from conftest import REPO, write_config

from part.config import ConfigError, load_config

ONE_STAGE = "  - {name: s1, steps: 4, tasks: {asr: 1.0}, trainable: [adapter], lr: 1.0e-3, warmup_steps: 1}"


def test_loads_with_overrides(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    cfg = load_config(path, ["stages.0.lr=5e-4", "data.languages=[en, de]", "model.adapter.kind=mlp"])
    assert cfg.stages[0].lr == 5e-4
    assert cfg.data.languages == ["en", "de"]
    assert cfg.model.adapter.kind == "mlp"
    assert cfg.total_steps == 4
    assert cfg.model.llm.lora.rank == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.adapter.kindd=mlp", "model.adapter.kindd: unknown field"),
        ("stages.0.steps=abc", "stages[0].steps: expected an integer"),
        ("stages.0.trainable=[adapter, encoder.topp.3]", "stages[0].trainable: unknown group 'encoder.topp.3'"),
        ("stages.0.tasks={}", "stages[0].tasks: empty mixture"),
        ("stages.0.tasks={asr: 1.0, dance: 1.0}", "stages[0].tasks.dance: unknown task"),
        ("data.text_shards=null", None),  # asr only: fine without text shards
        ("stages.0.languages=[en, xx]", "stages[0].languages: 'xx' is not in data.languages"),
        ("model.llm.pretrained=/nonexistent/llm", "model.llm.pretrained: directory '/nonexistent/llm' does not exist"),
        ("ds_config=/nonexistent.json", "ds_config: file '/nonexistent.json' does not exist"),
        ("stages.3.lr=1", "stages.3: no such list index"),
    ],
)
def test_errors_name_the_field(tmp_path, corpus, tiny_models, override, message):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    if message is None:
        load_config(path, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message in str(err.value)


def test_text_tasks_need_text_shards(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tasks\.mt: needs data.text_shards"):
        load_config(path, ["data.text_shards=null", "stages.0.tasks={asr: 1.0, mt: 0.5}"])


def test_lora_group_needs_lora(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match="model.llm.lora: a stage trains llm.lora"):
        load_config(path, ["model.llm.lora=null", "stages.0.trainable=[llm.lora]"])


def test_check_fails_before_any_process(tmp_path, corpus, tiny_models):
    """`train.py --check` is what the launch scripts run first: exit 2, the field named, no DeepSpeed start."""
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    bad = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "stages.0.warmup_steps=9"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "stages[0].warmup_steps: must be between 0 and steps" in bad.stderr
    # data is checked too: 2 ranks x 8 loader workers need more shards than the fixture has
    few = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "--world-size", "2",
                          "data.num_workers=8"], cwd=REPO, capture_output=True, text=True)
    assert few.returncode == 2
    assert "fewer than ranks x workers = 2 x 8" in few.stderr
    good = subprocess.run([sys.executable, "train.py", "--config", str(path), "--check", "--world-size", "2"],
                          cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "OK (1 stages, 4 steps)" in good.stdout


def test_shipped_configs_parse():
    """Every shipped recipe is a valid config tree (directories aside, which exist only after building)."""
    import yaml

    from part.config import TrainConfig, _build

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = _build(TrainConfig, yaml.safe_load(path.read_text()), "")
        assert cfg.stages, path

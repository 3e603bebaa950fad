import json

import pytest
from conftest import REPO, write_config

from part.config import ConfigError, deepspeed_config, load_config

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
        ("stages.0.group_lr={encoder: 1.0e-4}", "stages[0].group_lr: 'encoder' is not one of the stage's trainable"),
        ("stages.0.group_lr={adapter: 0}", "stages[0].group_lr.adapter: must be a number > 0"),
        ("stages.0.tasks={asr: 1.0, dance: 1.0}", "stages[0].tasks.dance: unknown task"),
        ("data.text_shards=null", None),  # asr only: fine without text shards
        ("stages.0.languages=[en, xx]", "stages[0].languages: 'xx' is not in data.languages"),
        ("model.llm.pretrained=/nonexistent/llm", "model.llm.pretrained: directory '/nonexistent/llm' does not exist"),
        ("ds_config=/nonexistent.json", "ds_config: file '/nonexistent.json' does not exist"),
        ("stages.3.lr=1", "stages.3: no such list index"),
        # values that would crash or hang later, refused up front
        ("data.max_batch_size=0", "data.max_batch_size: must be >= 1"),
        ("data.window=0", "data.window: must be >= data.max_batch_size"),
        ("data.max_batch_seconds=0", "data.max_batch_seconds: must be > 0"),
        ("stages.0.min_lr_ratio=-0.5", "stages[0].min_lr_ratio: must be in [0, 1]"),
        ("logging.every=0", "logging.every: must be >= 1"),
        ("logging.profile_start=-2", "logging.profile_start: must be >= 0 (or -1: no profile)"),
        ("logging.profile_start=1000000", "logging.profile_start: 1000000 is not before the run's last step"),
        ("logging.profile_steps=0", "logging.profile_steps: must be >= 1"),
        ("eval.batch_size=0", "eval.batch_size: must be >= 1"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1"),
        ("checkpoint.lean=sometimes", "checkpoint.lean: expected true/false, got 'sometimes'"),
        ("checkpoint.lean=false", None),
        ("stages.0.tasks={asr: 0.5, s2tt: 0.5}", None),
        ("stages.0.translation_targets=[]", None),  # asr only: no translation target needed
        ("model.llm.pretrained=/tmp", "model.llm.pretrained: '/tmp' is not a model directory"),
        ("ds_config=configs/tiny_part.yaml", "ds_config: 'configs/tiny_part.yaml' is not valid JSON"),
        ("stages.0.lm_loss=false", "stages[0].lm_loss: false leaves the stage no loss (configure model.alignment.ctc"),
        ("model.alignment.readout.temperature=0", "model.alignment.readout.temperature: must be > 0"),
        ("model.alignment.frame_targets.targets=middle",
         "model.alignment.frame_targets.targets: 'middle' is not one of centre, span"),
        ("model.alignment.frame_targets.weight=-1", "model.alignment.frame_targets.weight: must be >= 0"),
        ("data.audio_row_seconds=30", None),
        ("data.audio_row_seconds=1", "data.audio_row_seconds: 1.0 must be 0 (a row per clip) or hold the longest clip"),
        ("data.batching=greedy", "data.batching: 'greedy' is not one of sorted, fill"),
        ("data.batching=fill", None),
        ("data.shard_retries=-1", "data.shard_retries: -1 must be >= 0"),
        ("data.shard_retries=2.5", "data.shard_retries: expected an integer"),
        ("data.shard_retry_wait=-1", "data.shard_retry_wait: -1.0 must be >= 0 seconds"),
        ("data.shard_timeout=0", "data.shard_timeout: 0.0 must be > 0 seconds"),
        ("data.shard_retries=0", None),
        ("model.alignment.readout.blank_as=''", "model.alignment.readout.blank_as: a text of one token"),
        ("checkpoint.keep_stage_ends=true", None),
        ("model.alignment.readout.compress=true", None),
        ("model.alignment.readout.compress=maybe", "model.alignment.readout.compress: expected true/false"),
        ("distributed.timeout_s=0", "distributed.timeout_s: 0.0 must be > 0 seconds"),
        ("distributed.timeout_s=soon", "distributed.timeout_s: expected a number, got 'soon'"),
        ("distributed.stop_grace_s=-5", "distributed.stop_grace_s: -5.0 must be > 0 seconds (or null: derived)"),
        ("distributed.stop_grace_s=90", None),
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


def test_a_compressed_readout_needs_a_masked_attention_kernel(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match=r"model.alignment.readout.compress: the slot's holes need a mask"):
        load_config(path, ["model.alignment.readout.compress=true", "model.attn_implementation=flash_attention_2"])


def test_frame_targets_need_a_teacher_with_alignment_heads(tmp_path, corpus, tiny_models):
    """Checked before any process starts (preflight), by the objective's own check: the tiny encoder directory is
    a Whisper encoder without a decoder or alignment heads."""
    from part.train.preflight import preflight

    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    cfg = load_config(path, ["model.alignment.frame_targets.weight=1.0"])
    teacher = r"model.alignment.frame_targets.teacher \(default: model.encoder.pretrained\): "
    with pytest.raises(ConfigError, match=teacher + r"the frame targets need readable alignment heads \("):
        preflight(cfg, 1, source=path)


def test_audio_rows_need_a_whisper_encoder_and_no_frame_objectives(tmp_path, corpus, tiny_models):
    from tiny_encoders import build_tiny_encoder

    from part.train.preflight import preflight

    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match=r"data.audio_row_seconds: the frame objectives \(model.alignment\) read"):
        load_config(path, ["data.audio_row_seconds=30", "model.alignment.frame_targets.weight=1.0"])
    preflight(load_config(path, ["data.audio_row_seconds=30"]), 1, source=path)  # the tiny Whisper encoder reads rows
    wav2vec2 = build_tiny_encoder("wav2vec2", tmp_path / "wav2vec2")
    cfg = load_config(path, ["data.audio_row_seconds=30", f"model.encoder.pretrained={wav2vec2}"])
    with pytest.raises(ConfigError, match="data.audio_row_seconds: the wav2vec2 encoder reads a row per clip"):
        preflight(cfg, 1, source=path)


def test_translation_tasks_need_targets_and_ds_config_must_be_deepspeed(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.translation_targets: empty, but the stage has translation"):
        load_config(path, ["stages.0.tasks={asr: 0.5, s2tt: 0.5}", "stages.0.translation_targets=[]"])
    not_deepspeed = tmp_path / "x.json"
    not_deepspeed.write_text('{"model": 1}')
    with pytest.raises(ConfigError, match="is not a DeepSpeed config"):
        load_config(path, [f"ds_config={not_deepspeed}"])


def test_text_tasks_need_text_shards(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.tasks\.mt: needs data.text_shards"):
        load_config(path, ["data.text_shards=null", "stages.0.tasks={asr: 1.0, mt: 0.5}"])


def test_lora_group_needs_lora(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError, match="model.llm.lora: a stage trains llm.lora"):
        load_config(path, ["model.llm.lora=null", "stages.0.trainable=[llm.lora]"])


def test_shipped_configs_parse():
    """Every shipped recipe is a valid config tree (directories aside, which exist only after building)."""
    import yaml

    from part.config import TrainConfig, build_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = build_config(TrainConfig, yaml.safe_load(path.read_text()), "")
        assert cfg.stages, path


# ---------------------------------------------------------------- the DeepSpeed settings the YAML owns


@pytest.mark.parametrize(
    "override, message",
    [
        ("precision=bf16", "ds_config: '{ds}' has bf16.enabled=false, but precision is bf16"),
        ("optim.grad_accum_steps=2", "has gradient_accumulation_steps=1, but optim.grad_accum_steps is 2"),
        ("optim.grad_clip=0.5", "has gradient_clipping=1.0, but optim.grad_clip is 0.5"),
        ("zero_stage=2", "has zero_optimization.stage=3, but zero_stage is 2"),
        ("precision=fp16", "precision: 'fp16' is not one of bf16, fp32"),
    ],
)
def test_ds_config_must_agree_with_the_yaml(tmp_path, corpus, tiny_models, override, message):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert message.format(ds=REPO / "ds_configs" / "zero3_cpu.json") in str(err.value)
    # the same settings agree with a file that says so
    load_config(path, ["precision=bf16", f"ds_config={REPO}/ds_configs/zero3.json"])
    load_config(path, ["zero_stage=2", f"ds_config={REPO}/ds_configs/zero2_cpu.json"])


def test_deepspeed_config_is_the_file_with_the_yaml_settings(tmp_path, corpus, tiny_models):
    path = write_config(tmp_path / "c.yaml", corpus, tiny_models, ONE_STAGE)
    cfg = load_config(path)
    ds = deepspeed_config(cfg)
    on_disk = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    assert ds == on_disk  # validated to agree: writing the YAML's values over the file changes nothing
    cfg.optim.grad_accum_steps = 4  # were the YAML to say otherwise, the YAML would win
    assert deepspeed_config(cfg)["gradient_accumulation_steps"] == 4
    assert deepspeed_config(cfg)["zero_optimization"]["reduce_bucket_size"] == on_disk["zero_optimization"][
        "reduce_bucket_size"]


def test_the_collective_timeout_defaults_to_at_most_ten_minutes_and_the_grace_to_measured():
    from part.config import TrainConfig

    assert TrainConfig().distributed.timeout_s == 600.0
    assert TrainConfig().distributed.stop_grace_s is None

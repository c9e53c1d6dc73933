"""Config: every key of PRODUCT.md's example validates; bad configs exit 2 naming the dotted key (CLI subprocess)."""

import textwrap

import pytest

from raylm.config import ConfigError, load_config

PRODUCT_EXAMPLE = textwrap.dedent("""
    name: quickstart
    output_dir: outputs/quickstart
    seed: 0
    data:
      sources:
        - {path: data/*.jsonl, format: jsonl, text_field: text, label_field: label}
        - {builtin: python-docs}
        - {hf_dataset: NAME, split: train}
      clean: {strip_html: true, fix_unicode: true, normalize: NFKC, min_chars: 50, max_chars: 200000,
              dedup: near, near_dup_threshold: 0.8, scrub_pii: false}
      tokenizer: {train: {type: bpe, vocab_size: 8000}}
      block_size: 256
      split: {train: 0.7, val: 0.15, test: 0.15}
    model:
      task: causal_lm
      pretrained: null
      arch: {family: gpt2, n_layer: 4, d_model: 256, n_head: 4}
      dropout: 0.1
      freeze: {embeddings: false, layers: 0}
      lora: null
    train:
      num_workers: 2
      use_gpu: false
      cpus_per_worker: 1
      max_steps: 200
      batch_size: 8
      grad_accum: 1
      lr: 3.0e-4
      weight_decay: 0.01
      warmup_steps: 20
      lr_schedule: cosine
      clip_grad_norm: 1.0
      precision: fp32
      eval_every: 50
      checkpoint_every: 50
      keep_checkpoints: 2
      early_stopping: {patience: 3, min_delta: 0.0}
      max_failures: 1
      deepspeed: {zero_stage: 2, offload_optimizer: false, offload_params: false,
                  gradient_checkpointing: false, tensor_parallel: 1}
    tune:
      num_samples: 8
      max_concurrent: 2
      metric: val_loss
      mode: min
      space:
        train.lr: {loguniform: [1.0e-5, 1.0e-3]}
        train.batch_size: {choice: [4, 8, 16]}
        model.dropout: {uniform: [0.0, 0.3]}
      search: random
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
    serve:
      host: 127.0.0.1
      port: 8000
      autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 2}
      max_batch_size: 8
      batch_wait_timeout_s: 0.01
      max_prompt_tokens: 1024
      max_new_tokens: 256
      api_key_env: null
""")


@pytest.mark.timeout(30)
def test_product_example_validates_every_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(PRODUCT_EXAMPLE)
    cfg = load_config(p)
    assert cfg.data.sources[0].format == "jsonl" and cfg.data.sources[1].builtin == "python-docs"
    assert cfg.data.clean.near_dup_threshold == 0.8 and cfg.data.tokenizer.train.vocab_size == 8000
    assert cfg.tune.space["train.lr"] == {"loguniform": [1.0e-5, 1.0e-3]} and cfg.serve.max_new_tokens == 256


@pytest.mark.timeout(30)
def test_set_override_is_yaml_typed(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["data.block_size=64", "data.clean.scrub_pii=true", "seed=7"])
    assert (cfg.data.block_size, cfg.data.clean.scrub_pii, cfg.seed) == (64, True, 7)
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["data.tokenizer.pretrained=/x"])  # both train and pretrained
    assert e.value.key == "data.tokenizer"


BAD = [
    (["--set", "data.clean.bogus=1"], "data.clean.bogus", "unknown key"),
    (["--set", "data.block_size=lots"], "data.block_size", "integer"),
    (["--set", "data.split.train=0.9", "--set", "data.split.val=0.2"], "data.split", "sum to 1"),
    (["--set", "data.clean"], "data.clean", "KEY=VALUE"),
    (["--set", "train.batch_size=0"], "train.batch_size", "greater than"),
]


@pytest.mark.timeout(120)
def test_cli_bad_config_exits_2_naming_the_key(cli):
    for extra, key, reason in BAD:
        r = cli("validate", "-c", "configs/quickstart.yaml", *extra, timeout=60)
        assert r.returncode == 2, (extra, r.stderr)
        assert f"config error: {key}" in r.stderr and reason in r.stderr, (extra, r.stderr)
    ok = cli("validate", "-c", "configs/quickstart.yaml", timeout=60)
    assert ok.returncode == 0 and "block_size: 128" in ok.stdout

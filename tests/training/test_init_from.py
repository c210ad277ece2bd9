"""``checkpoint.init_from``: runs that start from a Hugging Face model (built by transformers in
the test, with the run's tokenizer) or from its ``megatron-tst import``.

The model's weights are large (noise of std 0.5 on every weight), so its first loss is far from
a fresh initialization's (~ln 96 = 4.6): a run that did not load them shows it at step 1. A
TP=2 and an EP=2 run give the one-process run's first loss; a TST run goes through both phases
from the import; a resumed run never reads init_from again.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli, write_tiny_recipe
from tests.export.hf_models import save_hf_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=128,
             max_position_embeddings=32)
MOE_SHAPE = dict(num_experts=4, moe_intermediate_size=64, num_experts_per_tok=2)
MOE = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
       "model.qk_layernorm=true"]
RUN = ["training.train_steps=2", "training.eval_interval=0", "schedule.warmup_steps=1",
       "checkpoint.save_final=false"]


def model_dir(root, arch, tokenizer_model, overrides):
    from megatron_tst.export.source import TokenizerLocation
    from megatron_tst.export.tokenizer import write_tokenizer

    def tokenizer(out):  # the run's sentencepiece tokenizer as Hugging Face files
        write_tokenizer(TokenizerLocation("sentencepiece", tokenizer_model), out,
                        model_max_length=32)

    return save_hf_model(root / arch, arch, overrides={**SHAPE, **overrides}, scale=0.5,
                         tokenizer=tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("init_from")
    return {"recipe": write_tiny_recipe(root, synthetic_data), "root": root,
            "dense": model_dir(root, "llama", synthetic_data["tokenizer"], {}),
            "moe": model_dir(root, "qwen3_moe", synthetic_data["tokenizer"], MOE_SHAPE)}


def first_loss(models, name, overrides, nproc=1) -> float:
    run_dir = models["root"] / name
    run_cli(["train", str(models["recipe"]), f"run_dir={run_dir}", *RUN, *overrides],
            nproc=nproc)
    train = read_metrics(run_dir)
    assert train[0]["step"] == 1
    return train[0]["loss"]


@pytest.mark.slow
def test_tp2_and_ep2_runs_start_from_a_hugging_face_model(models):
    # 128 rows at TP=1 and TP=2 alike: the zero padding rows' logits (0) take part in the
    # softmax as in any megatron run, so another padding would change the loss a little
    same = ["model.make_vocab_size_divisible_by=64"]
    fresh = first_loss(models, "fresh", [])
    dense = first_loss(models, "dense", [f"checkpoint.init_from={models['dense']}", *same])
    assert dense > fresh + 2, (dense, fresh)  # the model's weights, not an initialization
    events = [r["message"] for r in read_metrics(models["root"] / "dense", "event")]
    assert any("initialized the model weights from" in e for e in events)
    assert (models["root"] / "dense" / "init_from" / "import.json").is_file()
    tp2 = first_loss(models, "tp2", [f"checkpoint.init_from={models['dense']}",
                                     "parallel.tensor_model_parallel_size=2", *same], nproc=2)
    assert tp2 == pytest.approx(dense, rel=1e-5)

    moe = first_loss(models, "moe", [f"checkpoint.init_from={models['moe']}", *MOE])
    ep2 = first_loss(models, "ep2", [f"checkpoint.init_from={models['moe']}", *MOE,
                                     "parallel.expert_model_parallel_size=2"], nproc=2)
    assert ep2 == pytest.approx(moe, rel=1e-5)


def test_tst_run_continues_from_an_import_and_resumes_without_it(models, tmp_path):
    ckpt = tmp_path / "imported"
    run_cli(["import", str(models["dense"]), "--out", str(ckpt), "--recipe",
             str(models["recipe"])])
    run_dir = tmp_path / "tst"
    tst = ["tst.bag_size=2", "tst.ratio=null", "tst.superposition_steps=2",
           "training.train_steps=4", "checkpoint.save_interval=2", "training.eval_interval=0",
           "schedule.warmup_steps=1", f"run_dir={run_dir}"]
    run_cli(["train", str(models["recipe"]), *tst, "training.exit_at_step=2",
             f"checkpoint.init_from={ckpt}"])
    # the import is no longer needed: the run resumes from its own checkpoint
    run_cli(["train", str(models["recipe"]), *tst, f"checkpoint.init_from={tmp_path / 'gone'}"])
    train = read_metrics(run_dir)
    assert [r["phase"] for r in train] == ["superposition"] * 2 + ["recovery"] * 2
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # recovery starts from weights that began as the model's: far above a fresh run's loss
    fresh = first_loss(models, "fresh-again", [])
    assert train[2]["loss"] > fresh + 1


def test_a_recipe_that_does_not_describe_the_model_is_refused_before_writing(models, tmp_path):
    run_dir = tmp_path / "refused"
    result = run_cli(["train", str(models["recipe"]), f"run_dir={run_dir}", *RUN,
                      f"checkpoint.init_from={models['dense']}", "model.hidden_size=32",
                      "model.untie_embeddings=false"], check=False)
    assert result.returncode == 2, result.stderr
    assert "checkpoint.init_from" in result.stderr
    assert "model.hidden_size: the recipe has 32" in result.stderr
    assert "model.untie_embeddings" in result.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "init_from").exists()


def test_an_import_padded_for_another_layout_says_how_to_import_again(models, tmp_path):
    ckpt = tmp_path / "imported"  # padded to 128 rows (TP=1); TP=2 pads 96 to 256
    run_cli(["import", str(models["dense"]), "--out", str(ckpt), "--recipe",
             str(models["recipe"])])
    result = run_cli(["train", str(models["recipe"]), f"run_dir={tmp_path / 'run'}", *RUN,
                      f"checkpoint.init_from={ckpt}", "parallel.tensor_model_parallel_size=2"],
                     nproc=2, check=False)
    assert result.returncode != 0
    assert "padded to 128 rows" in result.stderr and "--recipe" in result.stderr

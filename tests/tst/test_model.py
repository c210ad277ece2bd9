"""TSTGPTModel: bags in, multi-hot CE of the next bag out, on megatron's [L, B, V] logits."""

import torch

from megatron_tst.config import load_config
from megatron_tst.models.gpt import build_model
from megatron_tst.tst.bags import fold_bags
from megatron_tst.tst.loss import mce_reference, slot_weights
from megatron_tst.tst.model import TSTGPTModel

V = 128


def cfg(*extra):
    return load_config(None, ["data.source=demo", "model.num_layers=2", "model.hidden_size=64",
                              "model.num_attention_heads=4", "model.ffn_hidden_size=96",
                              "model.seq_length=8", "schedule.warmup_steps=1", *extra])


def test_tst_runs_build_the_tst_model_and_baselines_do_not(megatron_env):
    assert isinstance(build_model(cfg("tst.bag_size=4", "tst.ratio=0.3"), V), TSTGPTModel)
    assert not isinstance(build_model(cfg("tst.bag_size=1"), V), TSTGPTModel)
    assert not isinstance(build_model(cfg("tst.bag_size=4", "tst.ratio=0"), V), TSTGPTModel)


def test_bag_labels_give_the_papers_loss(megatron_env):
    torch.manual_seed(0)
    model = build_model(cfg("tst.bag_size=4", "tst.ratio=0.3", "tst.weighting=power_law"), V)
    window = torch.randint(0, V, (3, 4 * 8 + 1))
    bags = fold_bags(window[:, :-1], window[:, 1:], 4)
    pos = torch.arange(8).expand(3, 8)
    loss = model(bags.inputs, pos, attention_mask=None, labels=bags.targets)
    logits = model(bags.inputs, pos, attention_mask=None)  # [B, L, V]
    ref = mce_reference(logits.reshape(-1, V), bags.targets.reshape(-1, 4),
                        slot_weights(4, "power_law"))
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_token_labels_are_megatrons_cross_entropy(megatron_env):
    model = build_model(cfg("tst.bag_size=4", "tst.ratio=0.3"), V)
    tokens, labels = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    per_token = model(tokens, pos, attention_mask=None, labels=labels)
    logits = model(tokens, pos, attention_mask=None)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                            reduction="none").view(2, 8)
    torch.testing.assert_close(per_token, ref, rtol=1e-5, atol=1e-5)

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


def test_linear_losses_equal_the_logits_path(megatron_env):
    """loss.implementation=chunked: no logits, same loss and gradients as fused, both phases."""
    from megatron_tst.tst.linear_loss import linear_mce  # noqa: F401 (import check)

    torch.manual_seed(0)
    fused = build_model(cfg("tst.bag_size=4", "tst.ratio=0.3", "tst.weighting=power_law"), V)
    chunked = build_model(cfg("tst.bag_size=4", "tst.ratio=0.3", "tst.weighting=power_law",
                              "loss.implementation=chunked"), V)
    chunked.load_state_dict(fused.state_dict())
    assert chunked.loss_impl == "chunked" and fused.loss_impl == "fused"
    window = torch.randint(0, V, (3, 4 * 8 + 1))
    bags = fold_bags(window[:, :-1], window[:, 1:], 4)
    pos = torch.arange(8).expand(3, 8)
    tokens, labels = window[:, :8], window[:, 1:9]
    for inputs, targets in ((bags.inputs, bags.targets), (tokens, labels)):
        out = []
        for model in (fused, chunked):
            model.zero_grad()
            loss = model(inputs, pos, attention_mask=None, labels=targets)
            loss.sum().backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(out[1][1], out[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # logits without labels still come back (evaluation, inference)
    assert chunked(tokens, pos, attention_mask=None).shape == (3, 8, V)


def test_linear_loss_builds_the_tst_model_for_baselines(megatron_env):
    model = build_model(cfg("tst.bag_size=1", "loss.implementation=chunked"), V)
    assert isinstance(model, TSTGPTModel) and model.loss_impl == "chunked"
    assert build_model(cfg("tst.bag_size=1"), V).__class__.__name__ == "GPTModel"  # auto on CPU


def test_loss_implementation_resolution(megatron_env):
    from megatron_tst.tst.implementations import resolve_loss_impl

    assert resolve_loss_impl(cfg().loss.implementation) == (
        "triton" if torch.cuda.is_available() else "fused")
    for impl in ("reference", "fused", "chunked"):
        assert resolve_loss_impl(cfg(f"loss.implementation={impl}").loss.implementation) == impl
    if not torch.cuda.is_available():  # no CUDA: the same loss through the PyTorch path
        assert resolve_loss_impl(cfg("loss.implementation=triton").loss.implementation) \
            == "chunked"

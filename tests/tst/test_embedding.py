"""Superposed embedding inside a real megatron GPTModel, against a plain-PyTorch mean."""

import pytest
import torch

from megatron_tst.config import load_config
from megatron_tst.models.gpt import build_model
from megatron_tst.tst.embedding import (SuperposedVocabParallelEmbedding, encode_bag_mask,
                                        install_superposed_embedding)

V, H = 128, 64


def tiny_model(dtype="float32"):
    cfg = load_config(None, ["data.source=demo", "model.num_layers=2", f"model.hidden_size={H}",
                             "model.num_attention_heads=4", "model.num_query_groups=2",
                             "model.ffn_hidden_size=96", "model.seq_length=8",
                             f"model.params_dtype={dtype}"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=V)
    assert install_superposed_embedding(model)
    return model


def plain_mean(weight: torch.Tensor, bags: torch.Tensor, mask=None) -> torch.Tensor:
    """[B, L, s] ids -> [L, B, H]: the paper's definition, element by element."""
    b, length, s = bags.shape
    out = torch.empty(length, b, weight.shape[1], dtype=weight.dtype)
    for i in range(b):
        for j in range(length):
            rows = [weight[bags[i, j, k]].double() for k in range(s)
                    if mask is None or mask[i, j, k]]
            out[j, i] = (torch.stack(rows).sum(0) / len(rows)).to(weight.dtype)
    return out


def test_no_new_parameters_and_same_names(megatron_env):
    before = tiny_model()
    names = [n for n, _ in before.named_parameters()]
    assert isinstance(before.embedding.word_embeddings, SuperposedVocabParallelEmbedding)
    assert [n for n, _ in tiny_model().named_parameters()] == names
    assert sum(p.numel() for p in before.parameters()) == sum(
        p.numel() for p in build_model(load_config(None, [
            "data.source=demo", "model.num_layers=2", f"model.hidden_size={H}",
            "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=96", "model.seq_length=8"]), vocab_size=V).parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mean_of_bag_embeddings(megatron_env, dtype):
    model = tiny_model(dtype)
    weight = model.embedding.word_embeddings.weight.detach()
    bags = torch.randint(0, V, (2, 8, 4))
    bags[0, 0] = torch.tensor([5, 5, 5, 9])  # duplicates count twice
    pos = torch.arange(8).expand(2, 8)
    out = model.embedding(input_ids=bags, position_ids=pos)  # [L, B, H]
    assert out.shape == (8, 2, H) and out.dtype == weight.dtype
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == "float32" else dict(rtol=8e-3, atol=0)  # one bf16 ulp
    torch.testing.assert_close(out, plain_mean(weight, bags), **tol)
    # 2-D input is the ordinary embedding, untouched
    flat = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model.embedding(input_ids=flat, position_ids=pos),
                               weight[flat].transpose(0, 1))


def test_masked_tokens_leave_the_mean(megatron_env):
    model = tiny_model()
    weight = model.embedding.word_embeddings.weight.detach()
    bags = torch.randint(0, V, (2, 8, 3))
    mask = torch.rand(2, 8, 3) > 0.4
    mask[..., -1] = True  # a bag's last token always stays (see fold_bags)
    out = model.embedding(input_ids=encode_bag_mask(bags, mask, V), position_ids=None)
    torch.testing.assert_close(out, plain_mean(weight, bags, mask), rtol=1e-6, atol=1e-6)


def test_latent_positions_are_0_to_L_minus_1(megatron_env):
    """Bags through the model == the plain mean fed as decoder input over L positions."""
    model = tiny_model().eval()
    weight = model.embedding.word_embeddings.weight.detach()
    bags = torch.randint(0, V, (2, 8, 4))
    pos = torch.arange(8).expand(2, 8)
    logits = model(bags, pos, attention_mask=None)
    assert logits.shape == (2, 8, V)
    ref = model(None, pos, attention_mask=None, decoder_input=plain_mean(weight, bags))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_gradient_flows_to_each_bag_token(megatron_env):
    model = tiny_model()
    bags = torch.tensor([[[1, 2, 2, 3]] * 8])
    model(bags, None, attention_mask=None).sum().backward()
    g = model.embedding.word_embeddings.weight.grad
    assert g[[1, 3]].abs().sum() > 0
    torch.testing.assert_close(g[2], 2 * g[1] * (g[2].norm() / (2 * g[1].norm())))  # same direction
    torch.testing.assert_close(g[2], 2 * g[3])  # a duplicate gets twice the weight
    assert g[4:].abs().sum() == 0

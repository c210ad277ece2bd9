"""Bags and next-bag targets against an independent, element-by-element reading of the method."""

import pytest
import torch

from megatron_tst.tst.bags import IGNORE_INDEX, fold_bags


def reference(window: list[int], s: int, eod=None):
    """TST-METHOD.md literally: bag j = window[j*s:(j+1)*s]; slot k of position j predicts
    window[j*s + k + s] when that exists; with eod, nothing crosses a document boundary."""
    n = len(window) - 1
    length = n // s
    doc, d = [], 0
    for tok in window:
        doc.append(d)
        if eod is not None and tok == eod:
            d += 1
    inputs, targets, mask = [], [], []
    for j in range(length):
        anchor = doc[j * s + s - 1]
        inputs.append(window[j * s:(j + 1) * s])
        mask.append([doc[j * s + k] == anchor for k in range(s)])
        row = []
        for k in range(s):
            i = j * s + k + s
            ok = i <= n and (eod is None or doc[i] == anchor)
            row.append(window[i] if ok else IGNORE_INDEX)
        targets.append(row)
    return inputs, targets, mask


def fold(window: list[int], s: int, eod=None):
    w = torch.tensor([window])
    return fold_bags(w[:, :-1], w[:, 1:], s, eod=eod)


def test_paper_layout_by_hand():
    # s=2, L=3: tokens a0..a5, plus a6 (the token after the window) for the last label.
    bags = fold([10, 11, 12, 13, 14, 15, 16], 2)
    assert bags.inputs[0].tolist() == [[10, 11], [12, 13], [14, 15]]
    assert bags.targets[0].tolist() == [[12, 13], [14, 15], [16, IGNORE_INDEX]]
    assert bags.input_mask is None


@pytest.mark.parametrize("s", [1, 2, 3, 4, 6])
def test_matches_reference_on_random_windows(s):
    g = torch.Generator().manual_seed(s)
    for _ in range(5):
        window = torch.randint(0, 50, (s * 7 + 1,), generator=g).tolist()
        bags = fold(window, s)
        inputs, targets, _ = reference(window, s)
        assert bags.inputs[0].tolist() == inputs
        assert bags.targets[0].tolist() == targets
        # the last latent position: exactly one real target, s-1 ignored
        assert (bags.targets[0, -1] != IGNORE_INDEX).sum() == 1


def test_bag_size_one_is_next_token_prediction():
    window = list(range(20, 29))
    bags = fold(window, 1)
    assert bags.inputs[0, :, 0].tolist() == window[:-1]
    assert bags.targets[0, :, 0].tolist() == window[1:]


def test_loss_mask_ignores_targets():
    w = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    mask = torch.ones(1, 6)
    mask[0, 3] = 0  # label 3 (= token 5) is not trained on
    bags = fold_bags(w[:, :-1], w[:, 1:], 2, loss_mask=mask)
    # label index 3 is window token 4 -> target of position 1, slot 0 (j*s+k+s-1 == 3)
    assert bags.targets[0].tolist() == [[3, 4], [IGNORE_INDEX, 6], [7, IGNORE_INDEX]]


@pytest.mark.parametrize("s", [2, 3, 4])
def test_respect_documents_matches_reference(s):
    eod = 0
    g = torch.Generator().manual_seed(100 + s)
    for _ in range(10):
        window = torch.randint(0, 6, (s * 6 + 1,), generator=g).tolist()  # EOD ~ 1 in 6
        bags = fold(window, s, eod=eod)
        inputs, targets, mask = reference(window, s, eod=eod)
        assert bags.inputs[0].tolist() == inputs
        assert bags.targets[0].tolist() == targets
        assert bags.input_mask[0].tolist() == mask


def test_respect_documents_by_hand():
    # s=3; EOD=0 ends document A inside bag 0; bag 1 is all document B.
    window = [5, 0, 7, 8, 9, 6, 4]
    bags = fold(window, 3, eod=0)
    # bag 0's last token (7) belongs to B: the A tokens (5 and its EOD) leave the mean
    assert bags.input_mask[0].tolist() == [[False, False, True], [True, True, True]]
    assert bags.targets[0].tolist() == [[8, 9, 6], [4, IGNORE_INDEX, IGNORE_INDEX]]
    # a bag ending in EOD predicts nothing of the next document
    window = [5, 6, 0, 8, 9, 6, 4]
    bags = fold(window, 3, eod=0)
    assert bags.targets[0, 0].tolist() == [IGNORE_INDEX] * 3


def test_batch_and_shape_errors():
    w = torch.arange(2 * 13).view(2, 13)
    bags = fold_bags(w[:, :-1], w[:, 1:], 4)
    assert bags.inputs.shape == bags.targets.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="multiple of the bag size"):
        fold_bags(w[:, :-1], w[:, 1:], 5)

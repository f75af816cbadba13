"""Zero-TPrune: weighted PageRank over the attention graph, then similarity-based pruning of the less important."""

import pytest
import torch
from test_tokens import padded_batch, run, tiny_encoder

from prunekit import tokens
from prunekit.tokens import merge


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


# Row i: how token i attends. Token 0 splits between 0 and 1, token 1 between 1 and 2, token 2 attends only to 0.
GRAPH = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]])


def test_weighted_pagerank_matches_a_hand_computed_graph():
    real = torch.ones(1, 3, dtype=torch.bool)
    # One step from uniform: the column sums / 3; two steps by hand: (0.5 * 0.5 + 1/6, 0.5 * 0.5 + 0.5/3, 0.5/3).
    torch.testing.assert_close(merge.weighted_pagerank(GRAPH, real, 1), torch.tensor([[1.5, 1.0, 0.5]]) / 3)
    torch.testing.assert_close(merge.weighted_pagerank(GRAPH, real, 2), torch.tensor([[5 / 12, 5 / 12, 1 / 6]]))
    # The fixed point of s = A^T s: s0 = s1 = 2 s2, so (0.4, 0.4, 0.2).
    torch.testing.assert_close(merge.weighted_pagerank(GRAPH, real, 200), torch.tensor([[0.4, 0.4, 0.2]]))


def test_weighted_pagerank_ignores_padding():
    # The same graph with a padding token in front, which nobody attends to and whose own row is arbitrary.
    padded = torch.zeros(1, 4, 4)
    padded[0, 1:, 1:] = GRAPH[0]
    padded[0, 0] = 0.25
    real = torch.tensor([[False, True, True, True]])
    scores = merge.weighted_pagerank(padded, real, 2)
    assert scores[0, 0] == 0
    torch.testing.assert_close(scores[:, 1:], merge.weighted_pagerank(GRAPH, torch.ones(1, 3, dtype=torch.bool), 2))


def test_importance_guided_matching_prunes_the_redundant_unimportant_tokens():
    # CLS (0) is protected. By importance, tokens 1, 3, 5 form the more important half; 2, 4 the less important.
    # Token 4 is a copy of 5 and token 2 is far from everything, so removing one token removes 4, matched to 5.
    importance = torch.tensor([[0.9, 0.3, 0.05, 0.2, 0.1, 0.25]])
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    real = torch.ones(1, 6, dtype=torch.bool)
    protected = merge.first_real(real)
    assert merge.max_similarity_prunes(real, protected).tolist() == [2]
    src, dst, valid = merge.importance_guided_matching(metric, importance, real, protected, torch.tensor([1]))
    assert (src.tolist(), dst.tolist(), valid.tolist()) == ([[4]], [[5]], [[True]])
    src, dst, valid = merge.importance_guided_matching(metric, importance, real, protected, torch.tensor([2]))
    assert sorted(src[0].tolist()) == [2, 4]


def test_installed_zero_tprune_removes_what_a_hand_computation_removes():
    model = tiny_encoder("eager", layers=1)
    ids, mask = padded_batch([12])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        attention = model.encoder.layer[0].attention.self
        keys = attention.key(out.hidden_states[0])[0].view(12, 4, 8).sum(1)  # the keys summed over heads
    graph = out.attentions[0][0].mean(0)
    importance = torch.ones(12) / 12 @ torch.linalg.matrix_power(graph, tokens.install.PAGERANK_ITERATIONS)
    order = torch.sort(-importance[1:], stable=True).indices + 1  # CLS is protected
    important, unimportant = order[:6], order[6:]
    unit = torch.nn.functional.normalize(keys, dim=-1)
    best = (unit[unimportant] @ unit[important].T).max(1).values
    removed = unimportant[torch.sort(-best, stable=True).indices[:4]]
    expected = torch.tensor([i for i in range(12) if i not in removed.tolist()])
    handle = tokens.apply(model, "zero-tprune", r=4)
    run(model, ids, mask)
    assert torch.equal(handle.source[0].any(0).nonzero().flatten(), expected)


def test_requested_counts_and_cls_are_kept():
    model = tiny_encoder(layers=3)
    ids, mask = padded_batch([24, 20])
    handle = tokens.apply(model, "zero-tprune", r=3)
    run(model, ids, mask)
    assert torch.equal(handle.kept, torch.tensor([[21, 17], [18, 14], [15, 11]]))
    source = handle.source
    assert source[:, 0, 0].all() and source.sum(2).le(1).all()  # CLS stays first; the rest are dropped, not merged
    handle.remove()
    handle = tokens.apply(model, "zero-tprune", keep=0.5)
    run(model, ids, mask)
    assert torch.equal(handle.kept[-1], torch.tensor([12, 10]))
    handle.remove()
    # At most the less important half of the unprotected tokens goes per block: 10 -> 6 -> 4 -> 3, 3 -> 2 -> 2 -> 2.
    ids, mask = padded_batch([10, 3])
    handle = tokens.apply(model, "zero-tprune", r=100)
    run(model, ids, mask)
    assert torch.equal(handle.kept, torch.tensor([[6, 2], [4, 2], [3, 2]]))

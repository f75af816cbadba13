import numpy as np
import pyarrow.parquet
import pytest
import torch
from torch import nn

from prunekit.assets import LoadedModel
from prunekit.data.api import prune_data
from prunekit.data.embed import embed_texts, embed_with, load_encoder
from prunekit.data.lm_scores import perplexity_scores
from prunekit.data.selectors import dedup_select
from prunekit.data.semantic import kmeans, prototype_scores, semdedup, semdedup_groups
from prunekit.errors import PrunekitError
from tiny_models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_set(seed=0, topics=6, per_topic=30, dim=48):
    """Topic clusters (within-topic cosine about 0.5), then 4 exact and 4 near duplicates (cosine about 0.97)
    of earlier examples appended at the end. Returns (embeddings, {duplicate index: source index}, exact set)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim))
    x = unit(np.repeat(centres, per_topic, axis=0) + rng.standard_normal((topics * per_topic, dim)))
    sources = rng.choice(len(x), 8, replace=False)
    exact = x[sources[:4]]
    near = unit(x[sources[4:]] + 0.03 * rng.standard_normal((4, dim)))
    planted = {len(x) + i: int(s) for i, s in enumerate(sources)}
    return np.concatenate([x, exact, near]), planted, set(range(len(x), len(x) + 4))


def test_semdedup_removes_the_planted_exact_and_near_duplicates_and_nothing_else():
    x, planted, exact = planted_set()
    result = semdedup(x, threshold=0.9, k=6, seed=0, progress=False)
    assert (result.rule, result.keep) == ("paper", "central")
    removed = set(np.flatnonzero(result.groups != np.arange(len(x))).tolist())
    # One member of every planted pair goes, whichever is nearer its centroid; exact copies tie, and the tie keeps
    # the earlier input (the source).
    assert all(len({copy, source} & removed) == 1 for copy, source in planted.items())
    assert len(removed) == 8 and exact <= removed
    assert all(result.groups[copy] == result.groups[source] for copy, source in planted.items())
    assert np.all(result.similarity[list(removed)] > 0.9)
    kept = np.delete(np.arange(len(x)), list(removed))
    assert np.all(result.similarity[kept] <= 0.9) and result.similarity.min() >= -1
    assert result.kept.tolist() == kept.tolist() == dedup_select(result.groups, result.similarity).tolist()
    assert result.duplicates == 8


def test_threshold_decides_which_near_duplicates_count():
    x, planted, exact = planted_set()
    groups = semdedup_groups(x, threshold=0.999, k=6, progress=False)
    assert {i for i in range(len(x)) if groups[i] != i} == exact


def chain():
    """Unit vectors at angles D = 100°, A = 0°, B = 18°, C = 36° in a plane: A~B and B~C (cosine 0.951), A and C
    not (0.809). With one cluster, D pulls the centroid so that the order from the farthest is D, A, B, C.
    Input order C, A, D, B."""
    angles = np.deg2rad([36.0, 0.0, 100.0, 18.0])
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


CHAIN_GROUPS = [
    ("paper", "farthest", [1, 1, 2, 1]),  # A kept; B removed for A, and C for B although B is removed
    ("greedy", "farthest", [0, 1, 2, 1]),  # C is compared with the kept D and A only, and stays
    ("paper", "central", [0, 0, 2, 0]),  # order C, B, A, D: C kept; B for C, A for B
    ("greedy", "central", [0, 1, 2, 0]),  # A is compared with the kept C only, and stays
]


@pytest.mark.parametrize("rule, keep, groups", CHAIN_GROUPS)
def test_a_chain_of_near_duplicates(rule, keep, groups):
    x = chain()
    result = semdedup(x, threshold=0.9, k=1, rule=rule, keep=keep, progress=False)
    assert result.groups.tolist() == groups
    sim = np.round(result.similarity, 3).tolist()
    if rule == "paper":  # each example's largest similarity to anything earlier in the order
        assert sim == ([0.951, -0.174, -1.0, 0.951] if keep == "farthest" else [-1.0, 0.951, 0.438, 0.951])
    assert result.kept.tolist() == dedup_select(result.groups, result.similarity).tolist()
    for block in (1, 2, 3):
        again = semdedup(x, threshold=0.9, k=1, rule=rule, keep=keep, block=block, progress=False)
        np.testing.assert_array_equal(again.groups, result.groups)


@pytest.mark.parametrize("rule, keep, groups", CHAIN_GROUPS)
def test_prune_data_keeps_the_member_the_rule_and_order_keep(rule, keep, groups, tmp_path):
    """Through `prune_data`: the kept example of a group is not always its first (A, index 1, over C, index 0)."""
    scores = tmp_path / "scores.parquet"
    record = prune_data(chain(), method="semdedup", threshold=0.9, clusters=1, semdedup_rule=rule,
                        semdedup_keep=keep, scores_out=scores, progress=False, threads=1)
    table = pyarrow.parquet.read_table(scores).to_pydict()
    assert table["group"] == groups
    assert table["keep"] == [g == i for i, g in enumerate(groups)]
    assert record["metrics"]["kept"] == len(set(groups))
    assert (record["method"]["scoring"]["rule"], record["method"]["scoring"]["keep"]) == (rule, keep)


def test_prune_data_refuses_an_unknown_rule_or_order_before_writing(tmp_path):
    scores = tmp_path / "scores.parquet"
    with pytest.raises(PrunekitError, match="SemDeDup keep order 'easy' is unknown; use one of central, farthest"):
        prune_data(chain(), method="semdedup", threshold=0.9, semdedup_keep="easy", scores_out=scores)
    with pytest.raises(PrunekitError, match="SemDeDup rule 'kept' is unknown; use one of paper, greedy"):
        prune_data(chain(), method="semdedup", threshold=0.9, semdedup_rule="kept", scores_out=scores)
    assert not scores.exists()


def brute_force(x, threshold, rule, keep):
    """Both rules written as plain loops over one cluster whose centroid is the normalised mean."""
    x = unit(x).astype(np.float64)
    centroid = x.mean(axis=0) / np.linalg.norm(x.mean(axis=0))
    to_centroid = x @ centroid
    order = np.argsort(to_centroid if keep == "farthest" else -to_centroid, kind="stable")
    sim = x[order] @ x[order].T
    parent = np.arange(len(x))
    kept = np.ones(len(x), dtype=bool)
    for j in range(1, len(x)):
        candidates = np.arange(j) if rule == "paper" else np.flatnonzero(kept[:j])
        i = candidates[np.argmax(sim[candidates, j])]
        if sim[i, j] > threshold:
            kept[j], parent[j] = False, i
    for j in range(len(x)):  # parents come earlier: one pass reaches the kept roots
        parent[j] = parent[parent[j]]
    groups = np.empty(len(x), dtype=np.int64)
    groups[order] = order[parent]
    return groups


def walks(seed, chains=12, length=5, dim=32, step=0.3):
    """`chains` random walks of `length` unit vectors in a random input order: consecutive steps have cosine about
    0.96, two steps apart about 0.92, different walks about 0."""
    rng = np.random.default_rng(seed)
    x = [unit(rng.standard_normal((chains, dim)))]
    for _ in range(length - 1):
        x.append(unit(x[-1] + step * unit(rng.standard_normal((chains, dim)))))
    x = np.concatenate(x)
    return x[rng.permutation(len(x))]


@pytest.mark.parametrize("rule", ["paper", "greedy"])
@pytest.mark.parametrize("keep", ["farthest", "central"])
def test_both_rules_equal_a_brute_force_loop_on_chains(rule, keep):
    x = walks(0)
    expected = brute_force(x, 0.95, rule, keep)
    assert 15 < len(np.unique(expected)) < 35  # chains: neither one survivor per walk nor every example
    for block in (2048, 7):
        groups = semdedup_groups(x, threshold=0.95, k=1, rule=rule, keep=keep, block=block, progress=False)
        np.testing.assert_array_equal(groups, expected)


def test_the_paper_rule_removes_more_than_the_greedy_rule_and_neither_keeps_a_near_pair():
    x = walks(1, chains=40)
    paper = semdedup(x, threshold=0.95, k=3, progress=False)
    greedy = semdedup(x, threshold=0.95, k=3, rule="greedy", progress=False)
    assert paper.duplicates > 1.2 * greedy.duplicates
    for result in (paper, greedy):
        kept = result.kept
        sim = x[kept] @ x[kept].T
        same = result.assignment[kept][:, None] == result.assignment[kept][None, :]
        assert not (np.triu(sim > 0.95, 1) & same).any()
    # Only the greedy rule promises each removed example a kept one above the threshold.
    removed = np.flatnonzero(greedy.groups != np.arange(len(x)))
    assert np.all(np.sum(x[removed] * x[greedy.groups[removed]], axis=1) > 0.95)
    removed = np.flatnonzero(paper.groups != np.arange(len(x)))
    assert np.any(np.sum(x[removed] * x[paper.groups[removed]], axis=1) <= 0.95)


def test_blocks_and_cluster_splitting_do_not_change_the_result():
    x, planted, exact = planted_set(seed=1)
    for rule in ("paper", "greedy"):
        whole = semdedup(x, threshold=0.9, k=6, rule=rule, progress=False)
        blocked = semdedup(x, threshold=0.9, k=6, rule=rule, block=7, progress=False)
        np.testing.assert_array_equal(whole.groups, blocked.groups)
        np.testing.assert_allclose(whole.similarity, blocked.similarity, atol=1e-6)
    # Clusters split down to 25 examples: exact duplicates always land together and are still found.
    split = semdedup(x, threshold=0.9, k=2, max_cluster_size=25, block=5, progress=False)
    removed = {i for i in range(len(x)) if split.groups[i] != i}
    assert exact <= removed and len(removed) <= len(planted)


def test_a_cluster_of_one_repeated_point_keeps_exactly_one():
    x = np.tile(unit(np.ones((1, 8))), (50, 1))
    for rule in ("paper", "greedy"):
        groups = semdedup_groups(x, threshold=0.5, k=1, rule=rule, block=8, progress=False)
        assert groups.tolist() == [0] * 50


def test_kmeans_and_prototypes_are_deterministic_under_a_seed():
    x, _, _ = planted_set()
    c1, a1 = kmeans(x, 6, seed=3)
    c2, a2 = kmeans(x, 6, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    assert c1.shape == (6, x.shape[1]) and a1.dtype == np.int64 and set(a1) == set(range(6))
    s1, s2 = prototype_scores(x, 6, seed=3), prototype_scores(x, 6, seed=3)
    np.testing.assert_array_equal(s1, s2)
    assert s1.dtype == np.float64 and s1.shape == (len(x),)
    assert (s1 >= -1e-6).all() and (s1 <= 2).all()


def test_prototype_score_is_the_cosine_distance_to_the_nearest_centroid():
    x, _, _ = planted_set()
    centroids, assignment = kmeans(x, 6, seed=0)
    expected = 1 - np.sum(x * unit(centroids)[assignment], axis=1)
    np.testing.assert_allclose(prototype_scores(x, 6, seed=0), expected, atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_are_refused(bad):
    x, _, _ = planted_set()
    x[17, 3] = bad
    with pytest.raises(PrunekitError, match="embeddings hold NaN or infinite values .* first row 17"):
        semdedup(x, threshold=0.9, progress=False)
    with pytest.raises(PrunekitError, match="NaN or infinite"):
        prototype_scores(x, 3)


def test_bad_arguments_are_refused():
    x, _, _ = planted_set()
    with pytest.raises(PrunekitError, match=r"threshold must be a cosine similarity in \(0, 1\), got 1.5"):
        semdedup(x, threshold=1.5)
    with pytest.raises(PrunekitError, match="SemDeDup rule 'kept' is unknown; use one of paper, greedy"):
        semdedup(x, threshold=0.9, rule="kept")
    with pytest.raises(PrunekitError, match="SemDeDup keep order 'hard' is unknown; use one of central, farthest"):
        semdedup(x, threshold=0.9, keep="hard")
    with pytest.raises(PrunekitError, match=r"k must be an integer in \[1, 188\]"):
        kmeans(x, 0)
    with pytest.raises(PrunekitError, match="must be a 2-D numpy array"):
        prototype_scores(np.zeros(5, np.float32), 1)
    with pytest.raises(PrunekitError, match="need at least one example"):
        prototype_scores(np.zeros((0, 4), np.float32), 1)


def test_embed_with_returns_the_penultimate_features_of_any_model():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(7, 3))
    x = torch.randn(10, 3, 4)
    features = embed_with(model, x, batch_size=4, progress=False)
    assert features.dtype == np.float32 and features.shape == (10, 7)
    np.testing.assert_allclose(features, body(x).detach().numpy(), atol=1e-6)
    chosen = embed_with(model, x, layer=body[1], normalize=True, progress=False)
    np.testing.assert_allclose(np.linalg.norm(chosen, axis=1), 1, atol=1e-6)
    assert model.training


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm-l6")


def test_minilm_embeddings_are_unit_mean_pooled_and_independent_of_batching(minilm):
    texts = ["The cat sat on the mat.", "A dog barked.", "Stock markets fell sharply on Monday after the report.",
             "The cat sat on the mat.", "Quantum computers use qubits."]
    one = embed_texts(texts, minilm, batch_size=1, progress=False)
    many = embed_texts(texts, minilm, batch_size=5, progress=False)
    assert one.shape == (5, 384) and one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(one, many, atol=1e-5)
    np.testing.assert_array_equal(one[0], one[3])
    # Mean pooling over the attention mask, computed by hand for one text.
    batch = minilm.tokenizer(texts[2], return_tensors="pt")
    with torch.no_grad():
        mean = minilm.model(**batch).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(one[2], (mean / mean.norm()).numpy(), atol=1e-5)
    # Paraphrases are near duplicates; unrelated sentences are not.
    pair = embed_texts(["The cat sat on the mat.", "The cat was sitting on the mat."], minilm, progress=False)
    assert pair[0] @ pair[1] > 0.85 and one[0] @ one[4] < 0.3


class ByteTokenizer:
    """Bytes + 3 as token ids, BOS = 1, pad = 0, for a tiny causal LM with a vocabulary of 259."""

    bos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, *, add_special_tokens, verbose=True):
        return {"input_ids": [[b + 3 for b in t.encode()] for t in texts]}


def test_perplexity_is_exp_mean_nll_per_text_whatever_the_batching():
    model = tiny_causal_lm("llama", vocab=259, seed=0).eval()
    loaded = LoadedModel(model=model, tokenizer=ByteTokenizer(), source="tiny", path=None)
    texts = ["hello world", "a", "the quick brown fox jumps over the lazy dog", "zzzz"]
    batched = perplexity_scores(texts, loaded, max_length=16, batch_size=3, progress=False)
    single = perplexity_scores(texts, loaded, max_length=16, batch_size=1, progress=False)
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    for text, score in zip(texts, single, strict=True):
        ids = torch.tensor([[1] + [b + 3 for b in text.encode()]][0][:16]).unsqueeze(0)
        with torch.no_grad():
            nll = nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
        assert score == pytest.approx(float(nll.exp()), rel=1e-5)
    with pytest.raises(PrunekitError, match="text 1 has 1 token"):
        perplexity_scores(["fine", ""], loaded, progress=False)

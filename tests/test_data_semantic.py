import numpy as np
import pytest
import torch
from torch import nn

from prunekit.assets import LoadedModel
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
    x, planted, _ = planted_set()
    result = semdedup(x, threshold=0.9, k=6, seed=0, progress=False)
    removed = {i for i in range(len(x)) if result.groups[i] != i}
    assert removed == set(planted)
    assert {i: int(result.groups[i]) for i in removed} == planted
    assert np.all(result.similarity[list(planted)] > 0.9)
    assert np.isnan(np.delete(result.similarity, list(planted))).all()
    kept = dedup_select(result.groups)
    assert kept.tolist() == sorted(set(range(len(x))) - set(planted))
    assert result.duplicates == 8


def test_threshold_decides_which_near_duplicates_count():
    x, planted, exact = planted_set()
    groups = semdedup_groups(x, threshold=0.999, k=6, progress=False)
    assert {i for i in range(len(x)) if groups[i] != i} == exact


def test_blocks_and_cluster_splitting_do_not_change_the_result():
    x, planted, exact = planted_set(seed=1)
    whole = semdedup(x, threshold=0.9, k=6, progress=False)
    blocked = semdedup(x, threshold=0.9, k=6, block=7, progress=False)
    np.testing.assert_array_equal(whole.groups, blocked.groups)
    # Clusters split down to 25 examples: exact duplicates always land together and are still found.
    split = semdedup(x, threshold=0.9, k=2, max_cluster_size=25, block=5, progress=False)
    assert exact <= {i for i in range(len(x)) if split.groups[i] != i} <= set(planted)


def test_a_cluster_of_one_repeated_point_keeps_exactly_one():
    x = np.tile(unit(np.ones((1, 8))), (50, 1))
    groups = semdedup_groups(x, threshold=0.5, k=1, block=8, progress=False)
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

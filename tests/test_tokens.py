"""Token merging and pruning installed on BERT-style encoders: tiny random encoders for the invariants."""

import pytest
import torch
import transformers

from prunekit import tokens
from prunekit.errors import PrunekitError
from prunekit.measure import weights_sha256
from prunekit.tokens import merge
from tiny_models import tiny_causal_lm

LENGTHS = [24, 17, 9, 3]  # a padded batch: one full row, three shorter ones down to CLS + two tokens


def tiny_encoder(implementation: str = "sdpa", layers: int = 3, seed: int = 0) -> transformers.BertModel:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64,
                                     attn_implementation=implementation)
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def padded_batch(lengths=LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 100, (n,), generator=generator)
        ids[row, 0] = 1  # CLS
        mask[row, :n] = 1
    return ids, mask


def run(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
@pytest.mark.parametrize("budget", [{"r": 0}, {"keep": 1.0}])
def test_no_reduction_is_bit_identical(implementation, method, budget):
    model = tiny_encoder(implementation)
    ids, mask = padded_batch()
    dense = run(model, ids, mask)
    handle = tokens.apply(model, method, **budget)
    out = run(model, ids, mask)
    assert torch.equal(out, dense)
    assert torch.equal(handle.sizes, mask.float())
    assert (handle.kept == mask.sum(1)).all()
    # Size-weighted pooling is sentence-transformers' mean over the attention mask when nothing merges.
    expected = (dense * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(handle.pool(out), expected)
    handle.remove()


@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
def test_remove_restores_exactly(method):
    model = tiny_encoder()
    ids, mask = padded_batch()
    dense = run(model, ids, mask)
    sha = weights_sha256(model)
    handle = tokens.apply(model, method, r=2)
    reduced = run(model, ids, mask)
    assert reduced.shape[1] < dense.shape[1]
    handle.remove()
    assert weights_sha256(model) == sha
    assert torch.equal(run(model, ids, mask), dense)
    for block in model.encoder.layer:
        assert "forward" not in vars(block)
        assert not block.attention.self.key._forward_hooks and not block.attention.self.query._forward_hooks
    tokens.apply(model, method, r=2).remove()  # installable again after remove


def test_tome_sizes_and_source_partition_the_input():
    model = tiny_encoder()
    ids, mask = padded_batch()
    handle = tokens.apply(model, "tome", r=3)
    out = run(model, ids, mask)
    assert out.shape[:2] == handle.sizes.shape == handle.mask.shape
    # Every example's sizes add up to its input length; padding slots hold nothing.
    torch.testing.assert_close(handle.sizes.sum(1), mask.sum(1).float())
    assert (handle.sizes[~handle.mask] == 0).all()
    # Each real input token lies in exactly one output token; padding inputs in none.
    source = handle.source
    assert torch.equal(source.sum(1), mask.bool().long())
    assert torch.equal(source.sum(2).float(), handle.sizes)
    # CLS is never merged: output token 0 holds exactly input token 0.
    assert torch.equal(source[:, 0], torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 24).bool())


@pytest.mark.parametrize("method", ["random", "cls-attention", "zero-tprune"])
def test_pruning_keeps_cls_and_drops_into_nothing(method):
    model = tiny_encoder()
    ids, mask = padded_batch()
    handle = tokens.apply(model, method, r=3)
    run(model, ids, mask)
    source = handle.source
    assert source.sum(2).le(1).all()  # pruned tokens are dropped, never merged
    assert torch.equal(source.sum((1, 2)), handle.mask.sum(1))
    assert source[:, 0, 0].all()
    assert torch.equal(handle.sizes, handle.mask.float())


@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [{"r": 2}, {"keep": 0.6}])
def test_padded_batch_equals_single_examples(method, implementation, budget):
    model = tiny_encoder(implementation)
    ids, mask = padded_batch()
    handle = tokens.apply(model, method, **budget)
    batch_out = run(model, ids, mask)
    batch_pooled, batch_sizes, batch_source = handle.pool(batch_out), handle.sizes, handle.source
    batch_real = handle.mask
    for row, n in enumerate(LENGTHS):
        single = run(model, ids[row:row + 1, :n], mask[row:row + 1, :n])
        kept = int(handle.mask.sum())
        assert int(batch_real[row].sum()) == kept
        torch.testing.assert_close(batch_out[row, :kept], single[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_pooled[row], handle.pool(single)[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch_sizes[row, :kept], handle.sizes[0])
        assert torch.equal(batch_source[row, :kept, :n], handle.source[0])


def test_left_padding_gives_the_same_tokens():
    model = tiny_encoder()
    ids, mask = padded_batch()
    handle = tokens.apply(model, "tome", r=2)
    right = run(model, ids, mask)
    right_sizes = handle.sizes
    left_ids, left_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for row, n in enumerate(LENGTHS):
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    # Position ids follow the tokens, as a left-padding tokenizer's model would need.
    positions = (left_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        left = model(input_ids=left_ids, attention_mask=left_mask, position_ids=positions).last_hidden_state
    assert torch.equal(handle.sizes, right_sizes)
    torch.testing.assert_close(left * handle.mask.unsqueeze(-1), right * handle.mask.unsqueeze(-1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
def test_requested_token_counts_are_exact(method):
    model = tiny_encoder(layers=3)
    ids, mask = padded_batch([24, 20])
    handle = tokens.apply(model, method, r=3)
    out = run(model, ids, mask)
    expected = torch.tensor([[21, 17], [18, 14], [15, 11]])
    assert torch.equal(handle.kept, expected)
    assert out.shape[1] == 15
    handle.remove()
    handle = tokens.apply(model, method, keep=0.5)
    run(model, ids, mask)
    assert torch.equal(handle.kept[-1], torch.tensor([12, 10]))  # ceil(0.5 * n), in equal steps
    assert (handle.kept[:-1] > handle.kept[1:]).all()


def test_requests_beyond_the_sequence_are_clamped_per_example():
    model = tiny_encoder(layers=3)
    ids, mask = padded_batch([10, 3])
    handle = tokens.apply(model, "tome", r=100)
    run(model, ids, mask)
    # ToMe merges at most the unprotected A half per step: 10 -> 6 -> 4 -> 3; 3 -> 2 -> 2 (CLS and one B left).
    assert torch.equal(handle.kept, torch.tensor([[6, 2], [4, 2], [3, 2]]))
    handle.remove()
    handle = tokens.apply(model, "cls-attention", r=100)
    run(model, ids, mask)
    assert torch.equal(handle.kept, torch.ones(3, 2, dtype=torch.long))  # CLS alone


def test_random_depends_on_the_seed_only():
    model = tiny_encoder()
    ids, mask = padded_batch()
    sources = []
    for seed in (0, 0, 1):
        handle = tokens.apply(model, "random", r=3, seed=seed)
        run(model, ids, mask)
        sources.append(handle.source)
        handle.remove()
    assert torch.equal(sources[0], sources[1])
    assert not torch.equal(sources[0], sources[2])


def test_cls_attention_keeps_the_most_attended_tokens():
    model = tiny_encoder("eager", layers=1)
    ids, mask = padded_batch([12])
    with torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    received = attentions[0, :, 0].mean(0)  # attention from CLS, averaged over heads
    handle = tokens.apply(model, "cls-attention", r=4)
    run(model, ids, mask)
    kept = handle.source[0].any(0).nonzero().flatten()
    expected = torch.cat([torch.tensor([0]), received[1:].topk(7).indices.sort().values + 1])
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_merging_identical_tokens_is_exact_with_proportional_attention(implementation):
    # Without position embeddings, six copies of one word are six identical tokens: ToMe merges them (3 in the
    # first block, 1 in the second) and the log-size bias makes attention see them with their full weight, so
    # the CLS output and the size-weighted mean equal the dense model's.
    model = tiny_encoder(implementation, layers=2)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    ids = torch.tensor([[1, 7, 7, 7, 7, 7, 7]])
    mask = torch.ones_like(ids)
    dense = run(model, ids, mask)
    handle = tokens.apply(model, "tome", r=3)
    out = run(model, ids, mask)
    assert handle.kept.flatten().tolist() == [4, 3]
    torch.testing.assert_close(out[:, 0], dense[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(handle.pool(out), dense.mean(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", tokens.ENCODER_METHODS)
def test_unmerge_with_nothing_removed_is_the_identity(method):
    model = tiny_encoder()
    ids, mask = padded_batch()
    handle = tokens.apply(model, method, r=0)
    out = run(model, ids, mask)
    unmerged = handle.unmerge(out, fill=-7.0)
    assert unmerged.shape == out.shape
    real = mask.bool()
    assert torch.equal(unmerged[real], out[real])
    assert (unmerged[~real] == -7.0).all()  # padding is held by no output token


def test_unmerge_puts_every_input_position_back():
    # Six copies of one word merge exactly (see above), so unmerging gives the dense output at every position.
    model = tiny_encoder(layers=2)
    with torch.no_grad():
        model.embeddings.position_embeddings.weight.zero_()
    ids, mask = torch.tensor([[1, 7, 7, 7, 7, 7, 7]]), torch.ones(1, 7, dtype=torch.long)
    dense = run(model, ids, mask)
    handle = tokens.apply(model, "tome", r=3)
    out = run(model, ids, mask)
    assert out.shape[1] == 3
    torch.testing.assert_close(handle.unmerge(out), dense, atol=1e-5, rtol=1e-5)
    # On a padded batch each input position reads the output token the source map gives it.
    handle.remove()
    ids, mask = padded_batch()
    handle = tokens.apply(model, "tome", r=2)
    out = run(model, ids, mask)
    unmerged = handle.unmerge(out)
    assert unmerged.shape == (4, 24, 32)
    source = handle.source.float()  # (B, T', N)
    torch.testing.assert_close(unmerged, torch.einsum("btn,btc->bnc", source, out))
    with pytest.raises(PrunekitError, match="do not match the last forward"):
        handle.unmerge(out[:, :-1])


def test_unmerge_of_dropped_tokens_is_the_fill():
    model = tiny_encoder()
    ids, mask = padded_batch()
    handle = tokens.apply(model, "cls-attention", r=3)
    out = run(model, ids, mask)
    unmerged = handle.unmerge(out, fill=float("nan"))
    held = handle.source.any(1)
    assert torch.isnan(unmerged[~held]).all() and not torch.isnan(unmerged[held]).any()


def test_merged_rows_are_size_weighted_means():
    x = torch.tensor([[[0.0], [1.0], [4.0], [10.0], [7.0]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 2.0]])
    # Tokens 2 and 4 merge into token 1; the third entry is filler (valid False) and must move nothing.
    src, dst = torch.tensor([[2, 4, 0]]), torch.tensor([[1, 1, 3]])
    valid = torch.tensor([[True, True, False]])
    rows, row_sizes = merge.merged_rows(x, sizes, src, dst, valid)
    expected = (3 * 1.0 + 4.0 + 2 * 7.0) / 6
    assert rows[0, :2, 0].tolist() == pytest.approx([expected, expected])
    assert row_sizes.tolist() == [[6.0, 6.0, 2.0]]
    assert rows[0, 2, 0] == 10.0  # bit for bit where nothing merges


def test_follow_and_compact_renumber_the_owner_map():
    owner = torch.tensor([[0, 1, 1, 1, 2, 3, 3, -1]])  # 7 input tokens held by 4 tokens, one padding input
    owner = merge.follow(owner, torch.tensor([[2, 3]]), torch.tensor([[1, -1]]), 4)  # 2 merges into 1, 3 dropped
    assert owner.tolist() == [[0, 1, 1, 1, 1, -1, -1, -1]]
    keep = torch.tensor([[True, True, False, False]])
    keep, position, owner, x = merge.compact(keep, owner, torch.arange(4.0).view(1, 4, 1))
    assert (keep.tolist(), position.tolist(), owner.tolist()) == (
        [[True, True]], [[0, 1, -1, -1]], [[0, 1, 1, 1, 1, -1, -1, -1]])
    assert x.flatten().tolist() == [0.0, 1.0]


def test_matching_pairs_similar_tokens_across_the_sets():
    # Tokens 2 (A) and 3 (B) are identical; token 4 (A) matches 1 (B) worse; CLS (0, A) is protected.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.2]]])
    real = torch.ones(1, 5, dtype=torch.bool)
    src, dst, valid = merge.bipartite_soft_matching(metric, real, merge.first_real(real), torch.tensor([1]))
    assert (src.tolist(), dst.tolist(), valid.tolist()) == ([[2]], [[3]], [[True]])
    src, dst, valid = merge.bipartite_soft_matching(metric, real, merge.first_real(real), torch.tensor([2]))
    assert (src.tolist(), dst.tolist()) == ([[2, 4]], [[3, 3]])


def test_reduction_schedule_spreads_evenly():
    schedule = merge.reduction_schedule(torch.tensor([100, 7]), 4, 0.3)
    assert schedule.sum(0).tolist() == [70, 4]
    assert (schedule.max(0).values - schedule.min(0).values).le(1).all()
    assert merge.reduction_schedule(torch.tensor([100]), 2, 0.07).sum() == 93  # 0.07 * 100 is 7.000000000000001


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "tome", "r": -1}, "r must be an integer >= 0"),
    ({"method": "tome", "r": 1.5}, "r must be an integer >= 0"),
    ({"method": "tome"}, "exactly one of r"),
    ({"method": "tome", "r": 2, "keep": 0.5}, "exactly one of r"),
    ({"method": "tome", "keep": 0.0}, "keep must be a fraction"),
    ({"method": "tome", "keep": 1.5}, "keep must be a fraction"),
    ({"method": "pagerank", "r": 2}, "unknown token method 'pagerank'"),
    ({"method": "random", "r": 2, "seed": -3}, "seed must be"),
])
def test_bad_arguments_raise_one_line_and_leave_the_model(kwargs, message):
    model = tiny_encoder()
    with pytest.raises(PrunekitError, match=message) as error:
        tokens.apply(model, **kwargs)
    assert "\n" not in str(error.value)
    assert all("forward" not in vars(block) for block in model.encoder.layer)


def test_unsupported_models_raise():
    with pytest.raises(PrunekitError, match="supports BERT-style encoders"):
        tokens.apply(tiny_causal_lm("llama"), r=2)
    with pytest.raises(PrunekitError, match="supports BERT-style encoders"):
        tokens.apply(torch.nn.Linear(3, 3), r=2)
    model = tiny_encoder()
    handle = tokens.apply(model, r=2)
    with pytest.raises(PrunekitError, match="already has token reduction installed"):
        tokens.apply(model, "random", r=1)
    handle.remove()


def test_handle_before_any_forward_raises():
    handle = tokens.apply(tiny_encoder(), r=2)
    with pytest.raises(PrunekitError, match="no forward pass"):
        _ = handle.sizes


@pytest.fixture(scope="module")
def minilm_batches():
    """all-MiniLM-L6-v2 and 64 BBC News test articles, tokenised to 256 in batches of 16."""
    from prunekit.corpus import load_texts
    from prunekit.data.embed import load_encoder

    encoder = load_encoder("minilm-l6")
    texts = load_texts("bbc-news", split="test")[:64]
    batches = [encoder.tokenizer(texts[i:i + 16], padding=True, truncation=True, max_length=256, return_tensors="pt")
               for i in range(0, len(texts), 16)]
    return encoder.model, batches


def embeddings(model, batches, handle=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit sentence embeddings (size-weighted mean pooling) and the tokens kept per example after the last block."""
    pooled, kept = [], []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            if handle is None:
                mask = batch["attention_mask"].unsqueeze(-1).float()
                pooled.append((hidden * mask).sum(1) / mask.sum(1))
                kept.append(batch["attention_mask"].sum(1))
            else:
                pooled.append(handle.pool(hidden))
                kept.append(handle.kept[-1])
    return torch.nn.functional.normalize(torch.cat(pooled), dim=1), torch.cat(kept)


@pytest.mark.slow
def test_tome_on_minilm_keeps_the_embeddings_and_informed_methods_beat_random(minilm_batches):
    model, batches = minilm_batches
    dense, lengths = embeddings(model, batches)
    cosines = {}
    for method in tokens.ENCODER_METHODS:
        handle = tokens.apply(model, method, r=4)
        reduced, kept = embeddings(model, batches, handle)
        handle.remove()
        assert torch.equal(kept, lengths - 24)  # 4 tokens in each of the 6 blocks, every article being long
        cosines[method] = (reduced * dense).sum(1).mean().item()
    assert cosines["tome"] >= 0.95
    assert all(cosines[method] > cosines["random"] for method in ("tome", "zero-tprune", "cls-attention"))
    assert torch.equal(embeddings(model, batches)[0], dense)  # removed exactly

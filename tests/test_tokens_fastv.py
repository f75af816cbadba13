"""FastV on decoder LLMs: tiny random Llama-style models for the invariants, SmolLM2 for one real check."""

import copy

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prunekit import tokens
from prunekit.adapters import adapter_for
from prunekit.errors import PrunekitError
from prunekit.measure import weights_sha256
from tiny_models import tiny_causal_lm

PROMPT = 20
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def decoder(family: str = "llama", layers: int = 4, implementation: str = "sdpa") -> transformers.PreTrainedModel:
    # tests/tiny_models.py gives Qwen 3 and SmolLM3 sliding-window layers, which FastV refuses.
    common = dict(vocab_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=64, intermediate_size=128)
    if family in ("qwen3", "smollm3"):
        torch.manual_seed(0)
        config = (transformers.Qwen3Config(**common, head_dim=16) if family == "qwen3" else
                  transformers.SmolLM3Config(**common, use_sliding_window=False, pad_token_id=0))
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    else:
        model = tiny_causal_lm(family, layers=layers)
    if family in ("llama", "gemma"):  # sharper attention than a random initialisation's, so positions matter
        for block in adapter_for(model).block_list(model):
            block.self_attn.q_proj.weight.data.mul_(8)
            block.self_attn.k_proj.weight.data.mul_(4)
    model.config._attn_implementation = implementation
    model.generation_config.eos_token_id = None  # random weights: generate every step, never stop early
    model.generation_config.pad_token_id = 0
    return model


def prompt(length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kwargs):
    """Greedy continuation with the cache: (new tokens, the logits that chose them)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=STEPS, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


def recompute(model, ids, kept, layer, steps=STEPS, positions=None):
    """Greedy decoding without a cache over the pruned sequence, written out over the model's parts: blocks below
    `layer` see every token, blocks from `layer` on only the `kept` prompt columns and all generated tokens, each at
    its original position (or at `positions`' renumbering), under a causal mask over those positions."""
    base, blocks = model.model, adapter_for(model).block_list(model)
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            hidden = base.embed_tokens(seq)
            pos = torch.arange(seq.shape[1])
            for index, block in enumerate(blocks):
                if index == layer:
                    columns = torch.cat([kept, torch.arange(ids.shape[1], seq.shape[1])])
                    hidden, pos = hidden[:, columns], pos[columns]
                    if positions is not None:
                        pos = positions(pos)
                rotary = base.rotary_emb(hidden, pos.unsqueeze(0))
                mask = torch.zeros(len(pos), len(pos)).masked_fill(pos.unsqueeze(0) > pos.unsqueeze(1), -torch.inf)
                hidden = block(hidden, attention_mask=mask[None, None], position_embeddings=rotary,
                               position_ids=pos.unsqueeze(0))
            step = model.lm_head(base.norm(hidden))[:, -1]
            logits.append(step)
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
    return seq[:, ids.shape[1]:], torch.stack(logits, 1)


@pytest.mark.parametrize("budget", [{"keep": 1.0}, {"r": 0}, {"keep": 0.5, "layer": 4}, {"keep": 0.5, "layer": 9}])
def test_nothing_pruned_is_bit_identical(budget):
    model, ids = decoder(), prompt()
    with torch.no_grad():
        dense = model(ids).logits
    tokens_dense, scores_dense = greedy(model, ids)
    handle = tokens.apply(model, "fastv", **budget)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    new, scores = greedy(model, ids)
    assert torch.equal(new, tokens_dense) and torch.equal(scores, scores_dense)
    handle.remove()


@pytest.mark.parametrize(("budget", "count"), [({"keep": 0.3}, 6), ({"keep": 0.5}, 10), ({"r": 5}, 15),
                                               ({"keep": 0.01}, 1)])
def test_exactly_the_requested_prompt_tokens_are_kept(budget, count):
    model, ids = decoder(), prompt()
    handle = tokens.apply(model, "fastv", layer=2, **budget)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert handle.kept.tolist() == [count]
    assert out.logits.shape[1] == count
    # Layers 0 and 1 cache the whole prompt, layers 2 and 3 only the kept tokens.
    assert [out.cache.get_seq_length(i) for i in range(4)] == [PROMPT, PROMPT, count, count]
    index = handle.kept_index[0]
    assert index[-1] == PROMPT - 1 and (index[1:] > index[:-1]).all()  # the last prompt token, all in order


def hand_ranking(model, ids, layer, rotate):
    """Attention of block layer-1 from the last token, averaged over heads, from the unpatched model's parts."""
    block = adapter_for(model).block_list(model)[layer - 1]
    attention = block.self_attn
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer - 1]
        normed = block.input_layernorm(hidden)
        q = attention.q_proj(normed).view(1, PROMPT, -1, attention.head_dim).transpose(1, 2)
        k = attention.k_proj(normed).view(1, PROMPT, -1, attention.head_dim).transpose(1, 2)
        if rotate:
            q, k = apply_rotary_pos_emb(q, k, *model.model.rotary_emb(hidden, torch.arange(PROMPT)[None]))
        k = k.repeat_interleave(attention.num_key_value_groups, dim=1)
        weights = ((q[:, :, -1:] @ k.transpose(2, 3)) * attention.scaling).softmax(-1)
    return weights[0, :, 0].mean(0)


@pytest.mark.parametrize("feather", [False, True])
def test_kept_tokens_are_the_most_attended_by_the_last_token(feather):
    model, ids = decoder(), prompt()
    received = hand_ranking(model, ids, 2, rotate=not feather)
    expected = torch.cat([received[:-1].topk(7).indices, torch.tensor([PROMPT - 1])]).sort().values
    handle = tokens.apply(model, "fastv", layer=2, keep=0.4, feather=feather)
    with torch.no_grad():
        model(ids)
    assert torch.equal(handle.kept_index[0], expected)
    # The rotary term matters here, so FEATHER's option changes the choice.
    other = hand_ranking(model, ids, 2, rotate=feather)
    assert not torch.equal(other[:-1].topk(7).indices.sort().values, expected[:-1])


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3", "olmo2"])
@pytest.mark.parametrize(("method", "layer", "feather"), [("fastv", 2, False), ("fastv", 1, True),
                                                          ("random", 3, False)])
def test_cached_generation_equals_recomputation_over_the_kept_tokens(family, method, layer, feather):
    model, ids = decoder(family), prompt()
    reference = copy.deepcopy(model)
    handle = tokens.apply(model, method, layer=layer, keep=0.5, feather=feather)
    new, scores = greedy(model, ids)
    kept = handle.kept_index[0]
    assert len(kept) == 10
    expected, expected_scores = recompute(reference, ids, kept, layer)
    assert torch.equal(new, expected)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
    # The test can tell positions apart: renumbering the kept tokens 0, 1, ... changes the logits.
    _, renumbered = recompute(reference, ids, kept, layer, positions=lambda pos: torch.arange(len(pos)))
    assert (renumbered - expected_scores).abs().max() > 1e-2


def test_a_ranking_layer_without_rotary_ranks_without_it():
    # SmolLM3 leaves out the rotary embedding in every fourth layer: layer 3 ranks for K = 4.
    model, ids = decoder("smollm3", layers=5), prompt()
    assert model.config.no_rope_layers[3] == 0
    reference = copy.deepcopy(model)
    received = hand_ranking(model, ids, 4, rotate=False)
    handle = tokens.apply(model, "fastv", layer=4, keep=0.5)
    new, scores = greedy(model, ids)
    assert torch.equal(handle.kept_index[0], torch.cat([received[:-1].topk(9).indices,
                                                        torch.tensor([PROMPT - 1])]).sort().values)
    expected, expected_scores = recompute(reference, ids, handle.kept_index[0], 4)
    assert torch.equal(new, expected)
    torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_continuation_with_the_cache_equals_recomputation(implementation):
    # A prompt, then a 5-token continuation fed at once through the pruned cache (how perplexity is measured).
    model, ids = decoder(implementation=implementation), prompt(25)
    reference = copy.deepcopy(model)
    continuation = prompt(5, seed=2)
    handle = tokens.apply(model, "fastv", layer=2, keep=0.6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        logits = model(continuation, cache=cache, use_cache=True).logits
    full = torch.cat([ids, continuation], 1)
    base, blocks = reference.model, adapter_for(reference).block_list(reference)
    with torch.no_grad():
        hidden, pos = base.embed_tokens(full), torch.arange(30)
        for index, block in enumerate(blocks):
            if index == 2:
                columns = torch.cat([handle.kept_index[0], torch.arange(25, 30)])
                hidden, pos = hidden[:, columns], pos[columns]
            mask = torch.zeros(len(pos), len(pos)).masked_fill(pos.unsqueeze(0) > pos.unsqueeze(1), -torch.inf)
            hidden = block(hidden, attention_mask=mask[None, None],
                           position_embeddings=base.rotary_emb(hidden, pos[None]), position_ids=pos[None])
        expected = reference.lm_head(base.norm(hidden))[:, -5:]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_left_padded_batch_equals_single_prompts(method):
    model = decoder()
    prompts = [prompt(20, seed=1)[0], prompt(13, seed=3)[0]]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 20 - len(p):], mask[row, 20 - len(p):] = p, 1
    handle = tokens.apply(model, method, layer=2, keep=0.5)
    new, scores = greedy(model, ids, attention_mask=mask)
    batch_index = handle.kept_index
    assert handle.kept.tolist() == [10, 7]
    assert (batch_index[1, :3] == -1).all()  # filler on the left of the shorter row
    for row, p in enumerate(prompts):
        single, single_scores = greedy(model, p.unsqueeze(0))
        assert torch.equal(batch_index[row][batch_index[row] >= 0] - (20 - len(p)), handle.kept_index[0])
        assert torch.equal(new[row], single[0])
        torch.testing.assert_close(scores[row], single_scores[0], atol=1e-4, rtol=1e-4)


def test_remove_restores_exactly():
    model, ids = decoder(), prompt()
    sha = weights_sha256(model)
    with torch.no_grad():
        dense = model(ids).logits
    tokens_dense, _ = greedy(model, ids)
    handle = tokens.apply(model, "fastv", layer=1, keep=0.3)
    assert not torch.equal(greedy(model, ids)[0], tokens_dense)
    handle.remove()
    assert weights_sha256(model) == sha
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert torch.equal(greedy(model, ids)[0], tokens_dense)
    for block in adapter_for(model).block_list(model):
        assert "forward" not in vars(block)
        assert not block.self_attn.q_proj._forward_hooks and not block.self_attn.k_proj._forward_hooks
    tokens.apply(model, "fastv", keep=0.5).remove()  # installable again


@pytest.mark.parametrize(("model", "kwargs", "message"), [
    ("llama", {"method": "fastv", "keep": 0.5, "layer": 0}, "layer must be an integer >= 1"),
    ("llama", {"method": "fastv", "keep": 0.5, "layer": -1}, "layer must be an integer >= 1"),
    ("llama", {"method": "fastv", "keep": 0.5, "layer": 1.5}, "layer must be an integer >= 1"),
    ("llama", {"method": "fastv", "keep": 0.0}, "keep must be a fraction"),
    ("llama", {"method": "fastv", "keep": 1.2}, "keep must be a fraction"),
    ("llama", {"method": "fastv", "r": -2}, "r must be an integer >= 0"),
    ("llama", {"method": "fastv", "keep": 0.5, "feather": 1}, "feather must be True or False"),
    ("llama", {"method": "tome", "r": 2}, "method 'tome' supports BERT-style encoders"),
    ("llama", {"method": "cls-attention", "keep": 0.5}, "for decoder LLMs .* use one of: fastv, random"),
    ("mistral", {"method": "fastv", "keep": 0.5}, "sliding-window layers"),
    ("gpt2", {"method": "fastv", "keep": 0.5}, "FastV supports Llama-style decoders"),
])
def test_bad_options_raise_one_line_and_leave_the_model(model, kwargs, message):
    model = decoder(model)
    with pytest.raises(PrunekitError, match=message) as error:
        tokens.apply(model, **kwargs)
    assert "\n" not in str(error.value)
    assert all("forward" not in vars(block) for block in adapter_for(model).block_list(model))


def test_encoder_options_are_refused_where_they_do_nothing():
    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=32))
    with pytest.raises(PrunekitError, match="method 'fastv' prunes the prompts"):
        tokens.apply(encoder, "fastv", keep=0.5)
    with pytest.raises(PrunekitError, match="layer and feather are options of fastv, random on decoder LLMs"):
        tokens.apply(encoder, "tome", r=2, layer=2)
    with pytest.raises(PrunekitError, match="layer and feather are FastV's options for decoder LLMs"):
        tokens.apply(encoder, "random", r=2, feather=True)
    model = decoder(implementation="flex_attention")
    with pytest.raises(PrunekitError, match="attention implementation 'flex_attention'"):
        tokens.apply(model, "fastv", keep=0.5)


def test_right_padding_is_refused():
    model = decoder()
    handle = tokens.apply(model, "fastv", keep=0.5)
    ids, mask = prompt(), torch.ones(1, PROMPT, dtype=torch.long)
    mask[0, -3:] = 0
    with pytest.raises(PrunekitError, match="left-padded"), torch.no_grad():
        model(ids, attention_mask=mask)
    handle.remove()


@pytest.mark.slow
def test_fastv_on_smollm2_generates_as_recomputed(smollm2):
    model = copy.deepcopy(smollm2.model)
    text = ("The Amazon rainforest covers much of the Amazon basin of South America. The region includes territory "
            "belonging to nine nations and 3,344 indigenous territories. The majority of the forest, 60%, is in "
            "Brazil, followed by Peru with 13% and Colombia with 10%.")
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    handle = tokens.apply(model, "fastv", layer=3, keep=0.5)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, output_scores=True)
    expected, expected_scores = recompute(smollm2.model, ids, handle.kept_index[0], 3, steps=8)
    assert torch.equal(out.sequences[:, ids.shape[1]:], expected)
    torch.testing.assert_close(torch.stack(out.scores, 1), expected_scores, atol=2e-3, rtol=1e-3)
    assert handle.kept_index[0, 0] == 0  # the first token (the attention sink) is among the most attended

"""Install token merging or pruning on one encoder instance (BERT-style, or prunekit's ViT), and take it off again.

Each block's `forward` is replaced on the instance (never on the class) by the same computation split at the
point ToMe uses, between attention and MLP (Bolya et al. 2023, Sec. 3): attention with the block's own modules,
then the token reduction, then the MLP on fewer tokens. The encoder keeps calling the blocks as usual; the shrunk
attention mask, the token sizes and the source map travel in the handle from block to block. Forward hooks on the
key and query projections hand their outputs to the reduction without recomputing them.

Until a block has removed a token, the blocks run with the encoder's own attention mask, so r = 0 (or keep = 1)
is bit-identical to the unpatched model. From then on the mask is additive: log(size) on real tokens (ToMe's
proportional attention, Eq. 1) and the dtype's minimum on padding.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.adapters import find_adapter
from prunekit.errors import PrunekitError
from prunekit.nets import VisionTransformer
from prunekit.tokens import fastv, merge

ENCODER_METHODS = ("tome", "zero-tprune", "cls-attention", "random")
PAGERANK_ITERATIONS = 10  # on MiniLM (BBC News, 256 tokens) the less important half is that of 200 iterations
METHODS = (*ENCODER_METHODS, "fastv")
_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # both accept an additive float mask
_INSTALLED = fastv._INSTALLED  # marks a block that carries a handle's forward


@dataclass
class _State:
    """What one forward pass carries from block to block."""

    real: torch.Tensor  # (B, T) bool, real tokens
    sizes: torch.Tensor  # (B, T) input tokens held, 0 on padding
    owner: torch.Tensor  # (B, N) the token that holds each input token, -1 for none (padding, dropped)
    schedule: torch.Tensor | None  # (layers, B) tokens to remove per block, for a keep fraction
    reduced: bool = False  # a block has removed tokens, so the encoder's mask no longer fits
    kept: list[torch.Tensor] = field(default_factory=list)


class TokenHandle:
    """Token reduction installed on a model; `remove()` restores it exactly.

    After a forward pass: `mask` (B, T') bool marks the real tokens of the output, `sizes` (B, T') how many input
    tokens each output token holds (0 on padding), `source` (B, T', N) bool which input tokens (a partition of
    each example's input tokens for ToMe; dropped tokens belong to none), `owner` (B, N) the same map read the
    other way (the output token holding each input token, -1 for none), and `kept` (layers, B) the real tokens left
    after each block. `pool` gives the size-weighted mean embedding.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, method: str, r: int | None, keep: float | None,
                 seed: int):
        self.model = model
        self.method = method
        self.r = r
        self.keep = keep
        self.seed = seed
        self._blocks = blocks
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._state: _State | None = None

    # Results of the last forward pass.
    @property
    def mask(self) -> torch.Tensor:
        return self._last().real

    @property
    def sizes(self) -> torch.Tensor:
        return self._last().sizes

    @property
    def source(self) -> torch.Tensor:
        state = self._last()
        owner = state.owner
        source = torch.zeros(*state.real.shape, owner.shape[1] + 1, dtype=torch.bool, device=owner.device)
        # Input tokens held by none go to a spare column that is cut off.
        column = torch.where(owner >= 0, torch.arange(owner.shape[1], device=owner.device), owner.shape[1])
        source[torch.arange(owner.shape[0]).unsqueeze(1), owner.clamp_min(0), column] = True
        return source[..., :-1]

    @property
    def owner(self) -> torch.Tensor:
        return self._last().owner

    @property
    def kept(self) -> torch.Tensor:
        return torch.stack(self._last().kept)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean pooling over the input tokens: each output token weighted by its size (B, C).

        Equals sentence-transformers' mean over the attention mask when nothing was merged.
        """
        weight = self.sizes.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weight).sum(1) / weight.sum(1).clamp_min(1e-9)

    def unmerge(self, outputs: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token outputs (B, T', ...) of the last forward mapped back to the input positions (B, N, ...), for
        dense prediction: each input token gets the row of the output token that holds it (ToMe's unmerging through
        the source map); input tokens that no output token holds (padding, or dropped by a pruning method) get
        `fill`."""
        state = self._last()
        if outputs.shape[:2] != state.real.shape:
            raise PrunekitError(f"outputs of shape {tuple(outputs.shape)} do not match the last forward's "
                                f"{tuple(state.real.shape)} (batch, tokens); pass that forward's per-token outputs")
        held = state.owner >= 0
        shape = (*state.owner.shape, *([1] * (outputs.dim() - 2)))
        index = state.owner.clamp_min(0).view(shape).expand(-1, -1, *outputs.shape[2:])
        return outputs.gather(1, index).masked_fill(~held.view(shape), fill)

    def remove(self) -> None:
        """Take the token reduction off: the blocks get their class's forward back and the hooks go."""
        fastv.uninstall(self, self._hooks, self._blocks)

    def _last(self) -> _State:
        if self._state is None:
            raise PrunekitError("no forward pass has run with the token reduction installed yet")
        return self._state

    def _install(self, family: str) -> None:
        for index, block in enumerate(self._blocks):
            if family == "vit":
                self._hooks.append(block.attn.qkv.register_forward_hook(self._capture_qkv))
                forward = _vit_block_forward(self, index)
            else:
                attention = block.attention.self
                self._hooks.append(attention.key.register_forward_hook(self._capture("key")))
                self._hooks.append(attention.query.register_forward_hook(self._capture("query")))
                forward = _bert_block_forward(self, index)
            block.forward = types.MethodType(forward, block)
            setattr(block, _INSTALLED, self)

    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._captured[name] = output
        return hook

    def _capture_qkv(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._captured["query"], self._captured["key"], _ = output.chunk(3, dim=-1)

    def _start(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        real = _real_tokens(attention_mask, hidden)
        length = real.shape[1]
        self._state = _State(
            real=real,
            sizes=real.to(hidden.dtype),
            owner=torch.where(real, torch.arange(length, device=hidden.device), -1),
            schedule=None if self.keep is None else merge.reduction_schedule(real.sum(1), len(self._blocks), self.keep),
        )

    def _count(self, layer: int, real: torch.Tensor) -> torch.Tensor:
        """(B,) tokens to remove in block `layer`, before the method's own limit."""
        if self.r is not None:
            return torch.full((real.shape[0],), self.r, dtype=torch.long, device=real.device)
        return self._state.schedule[layer]

    def _reduce(self, layer: int, x: torch.Tensor, bias: torch.Tensor, heads: int, scaling: float) -> torch.Tensor:
        """Merge or drop tokens of `x` (B, T, C) after block `layer`'s attention, whose logits had `bias` added."""
        state = self._state
        protected = merge.first_real(state.real)
        keys = self._captured.pop("key")
        query = self._captured.pop("query")
        if self.method == "tome":
            limit = merge.max_merges(state.real, protected)
        elif self.method == "zero-tprune":
            limit = merge.max_similarity_prunes(state.real, protected)
        else:
            limit = (state.real & ~protected).sum(1)
        count = torch.minimum(self._count(layer, state.real), limit)
        if int(count.max()) == 0:
            state.kept.append(state.real.sum(1))
            return x
        head_dim = keys.shape[-1] // heads
        if self.method in ("tome", "zero-tprune"):  # the similarity metric; the other methods never read it
            # ToMe's metric: the keys averaged over heads (Sec. 3, "Token similarity"); a sum has the same cosines.
            metric = keys @ torch.eye(head_dim, dtype=keys.dtype, device=keys.device).repeat(heads, 1)
        keys_by_head = keys.view(*keys.shape[:2], heads, head_dim).transpose(1, 2)
        if self.method == "tome":
            src, dst, valid = merge.bipartite_soft_matching(metric, state.real, protected, count)
            rows, row_sizes = merge.merged_rows(x, state.sizes, src, dst, valid)
            owner = merge.follow(state.owner, src, torch.where(valid, dst, src), x.shape[1])
        else:
            if self.method == "zero-tprune":
                query_by_head = query.view(*query.shape[:2], heads, head_dim).transpose(1, 2)
                graph = merge.attention_graph(query_by_head, keys_by_head, bias, scaling)
                importance = merge.weighted_pagerank(graph, state.real, PAGERANK_ITERATIONS)
                src, _, valid = merge.importance_guided_matching(metric, importance, state.real, protected, count)
            else:
                if self.method == "random":
                    scores = self._random_scores(layer, state.real)
                else:
                    query_cls = query[torch.arange(query.shape[0]), protected.float().argmax(1)].view(-1, heads,
                                                                                                    head_dim)
                    scores = merge.cls_attention(query_cls, keys_by_head, bias, scaling)
                src, valid = merge.lowest_ranked(scores.masked_fill(~(state.real & ~protected), torch.inf), count)
            owner = merge.follow(state.owner, src, torch.where(valid, -1, src), x.shape[1])
        keep = state.real & ~merge.chosen_mask(src, valid, x.shape[1])
        state.real, position, state.owner, x, state.sizes = merge.compact(keep, owner, x, state.sizes)
        if self.method == "tome":
            # The merge destinations are kept tokens: write their averaged features into their new places. Filler
            # entries rewrite slot 0 (CLS, never a destination) with its own values.
            places = torch.where(valid, position.gather(1, dst), 0)
            rows = torch.where(valid.unsqueeze(-1), rows, x[:, :1])
            row_sizes = torch.where(valid, row_sizes, state.sizes[:, :1])
            # x and sizes are fresh from compact; entries that share a place carry equal values
            x[torch.arange(x.shape[0], device=x.device).unsqueeze(1), places] = rows
            state.sizes.scatter_(1, places, row_sizes)
        state.sizes = state.sizes * state.real
        state.reduced = True
        state.kept.append(state.real.sum(1))
        return x

    def _random_scores(self, layer: int, real: torch.Tensor) -> torch.Tensor:
        """Uniform scores drawn per (seed, layer) and indexed by rank among real tokens, so an example draws the
        same tokens alone as in a padded batch."""
        generator = torch.Generator().manual_seed(self.seed * 1009 + layer)
        draws = torch.rand(real.shape[1], generator=generator).to(real.device)
        return draws[merge.real_rank(real).clamp_min(0)]


def _real_tokens(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T) real tokens from the mask the encoder hands its blocks: None (no padding), or (B, 1, T, T) boolean
    (sdpa: True attends) or additive float (eager: 0 attends)."""
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    row = attention_mask[:, 0, 0, :]
    real = row if row.dtype == torch.bool else row == 0
    return real.expand(batch, length)


def _additive_mask(state: _State, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) additive attention bias: log(size) on real tokens (proportional attention), the minimum on padding."""
    bias = torch.log(state.sizes.clamp_min(1).to(dtype))
    return bias.masked_fill(~state.real, torch.finfo(dtype).min)


def _bert_block_forward(handle: TokenHandle, layer: int):
    """A BertLayer forward (transformers 5.x: attention, then `feed_forward_chunk`) with the reduction between."""

    def forward(block: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args, **kwargs) -> torch.Tensor:
        kwargs.pop("encoder_attention_mask", None)
        if layer == 0:
            handle._start(hidden_states, attention_mask)
        state = handle._state
        bias = _additive_mask(state, hidden_states.dtype)
        mask = bias[:, None, None, :] if state.reduced else attention_mask
        attention_output, _ = block.attention(hidden_states, mask, **kwargs)
        attention = block.attention.self
        attention_output = handle._reduce(layer, attention_output, bias, attention.num_attention_heads,
                                          attention.scaling)
        return block.feed_forward_chunk(attention_output)

    return forward


def _vit_block_forward(handle: TokenHandle, layer: int):
    """A `prunekit.nets.ViTBlock` forward with the reduction between the attention and the MLP residuals."""

    def forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer == 0:
            handle._start(x, None)
        state = handle._state
        bias = _additive_mask(state, x.dtype)
        x = x + block.attn(block.norm1(x), bias if state.reduced else None)
        x = handle._reduce(layer, x, bias, block.attn.heads, block.attn.scaling)
        return x + block.mlp(block.norm2(x))

    return forward


def _check_budget(r: int | None, keep: float | None) -> None:
    if (r is None) == (keep is None):
        raise PrunekitError(f"give exactly one of r (tokens removed per layer) or keep (fraction of tokens kept); "
                            f"got r={r!r}, keep={keep!r}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise PrunekitError(f"r must be an integer >= 0 (tokens removed per layer), got {r!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                             or not math.isfinite(keep) or not 0 < keep <= 1):
        raise PrunekitError(f"keep must be a fraction in (0, 1] of the tokens kept, got {keep!r}")


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's family ('bert' or 'vit') and block list, checked before anything is installed."""
    if isinstance(model, VisionTransformer):
        family, blocks = "vit", model.blocks
    else:
        family, blocks = "bert", _encoder_blocks(model)
    if any(hasattr(block, _INSTALLED) for block in blocks):
        raise PrunekitError(f"{type(model).__name__} already has token reduction installed; call remove() on its "
                            f"handle first")
    return family, blocks


def _encoder_blocks(model: nn.Module) -> nn.ModuleList:
    adapter = find_adapter(model)
    if adapter is None or adapter.family != "bert":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise PrunekitError(f"token reduction supports BERT-style encoders (model_type 'bert') and "
                            f"prunekit.nets.VisionTransformer; got "
                            f"{type(model).__name__} (model_type {model_type!r})")
    config = model.config
    implementation = config._attn_implementation
    if implementation not in _ATTENTION_IMPLEMENTATIONS:
        raise PrunekitError(f"attention implementation {implementation!r} cannot take the proportional-attention "
                            f"bias; load the model with attn_implementation 'eager' or 'sdpa'")
    if config.is_decoder or config.chunk_size_feed_forward:
        raise PrunekitError("token reduction supports bidirectional encoders without feed-forward chunking; got "
                            f"is_decoder={config.is_decoder}, chunk_size_feed_forward={config.chunk_size_feed_forward}")
    return adapter.block_list(model)


def check_options(method: str, *, r: int | None = None, keep: float | None = None, seed: int = 0,
                  layer: int | None = None, feather: bool = False) -> None:
    """The checks of `apply` that need no model, so that a command line can fail before loading one."""
    if method not in METHODS:
        raise PrunekitError(f"unknown token method {method!r}; known: {', '.join(METHODS)}")
    _check_budget(r, keep)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PrunekitError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(feather, bool):
        raise PrunekitError(f"feather must be True or False, got {feather!r}")
    if (layer is not None or feather) and method not in fastv.DECODER_METHODS:
        raise PrunekitError(f"layer and feather are options of {', '.join(fastv.DECODER_METHODS)} on decoder LLMs; "
                            f"got layer={layer!r}, feather={feather!r} for method {method!r}")
    if layer is not None:
        fastv.check_options(layer, r, keep)


def apply(model: nn.Module, method: str = "tome", *, r: int | None = None, keep: float | None = None,
          seed: int = 0, layer: int | None = None, feather: bool = False) -> TokenHandle | fastv.DecoderTokenHandle:
    """Install token merging or pruning on `model` (this instance only) and return the handle that removes it.

    model: a BERT-style encoder (Hugging Face, eager or sdpa attention) or a `prunekit.nets.VisionTransformer`;
        for 'fastv' and 'random', also a Llama-style decoder LLM (full attention in every layer, eager or sdpa).

    method: 'tome' merges tokens by bipartite soft matching of the attention keys (Bolya et al. 2023) with
        size-weighted averages and proportional attention; 'cls-attention' drops the tokens that receive the least
        attention from CLS (EViT-style, without fusing them); 'zero-tprune' ranks tokens by weighted PageRank over
        the head-averaged attention graph and drops the less important tokens most similar to a more important
        one (Wang et al. 2024; at most half of the unprotected tokens per block); 'random' drops random tokens
        (the baseline; `seed`).
    r: tokens removed per block; keep: fraction of each example's tokens left after the last block, removed in
        equal steps. The first real token (CLS) is never removed. A step asking more than an example has is
        clamped per example (ToMe can merge at most the unprotected half of the tokens in one step), since the
        examples of a padded batch differ in length; `handle.kept` reports what each block kept.

    On a decoder LLM ('fastv', or 'random' as its baseline) the prompt is pruned once, before block `layer`
    (FastV's K, default 2), ranked by the attention of block K-1 from the last prompt token (`feather=True`: without
    the rotary embedding, Endo et al. 2024); `keep` is the fraction of prompt tokens kept, `r` the number removed.
    Returns a `prunekit.tokens.fastv.DecoderTokenHandle`.
    """
    check_options(method, r=r, keep=keep, seed=seed, layer=layer, feather=feather)
    adapter = find_adapter(model)
    if adapter is not None and adapter.causal:
        return _apply_decoder(model, adapter, method, r, keep, seed, layer, feather)
    if layer is not None or feather:
        raise PrunekitError(f"layer and feather are FastV's options for decoder LLMs; got layer={layer!r}, "
                            f"feather={feather!r} for {type(model).__name__}")
    if method == "fastv":
        raise PrunekitError(f"method 'fastv' prunes the prompts of Llama-style decoder LLMs; got "
                            f"{type(model).__name__}; for encoders use one of: {', '.join(ENCODER_METHODS)}")
    family, blocks = _blocks(model)
    handle = TokenHandle(model, blocks, method, r, None if keep is None else float(keep), seed)
    handle._install(family)
    return handle


def _apply_decoder(model: nn.Module, adapter, method: str, r: int | None, keep: float | None, seed: int,
                   layer: int | None, feather: bool) -> fastv.DecoderTokenHandle:
    fastv.check_decoder(model, adapter, method)
    layer = fastv.DEFAULT_LAYER if layer is None else layer
    fastv.check_options(layer, r, keep)
    blocks = adapter.block_list(model)
    if any(hasattr(block, _INSTALLED) for block in blocks):
        raise PrunekitError(f"{type(model).__name__} already has token reduction installed; call remove() on its "
                            f"handle first")
    handle = fastv.DecoderTokenHandle(model, blocks, adapter, method, layer, r,
                                      None if keep is None else float(keep), feather, seed)
    handle._install()
    return handle

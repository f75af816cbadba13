"""FastV (Chen et al. 2024) on decoder LLMs: after the first K layers, only the prompt tokens that the last prompt
token attends to most go on; the later layers, and their KV cache, hold only those.

The attention of layer K-1 (the last layer that sees the whole prompt) from the last prompt token, averaged over
heads, ranks the prompt tokens (FastV, Sec. 4: "the average attention score one token received" at layer K; the
reference code reads the last token's row). It is computed here from that layer's own queries and keys, captured by
forward hooks on its query and key projections (or their q/k norms), with the layer's rotary embedding applied to
them, so the model keeps its own attention kernel (sdpa or eager). FEATHER (Endo et al. 2024) observed that the
rotary term biases this criterion towards the end of the prompt; `feather=True` ranks by the un-rotated q.k.

The kept tokens keep their original positions: layers K.. receive the rotary embeddings and position ids of the
kept positions, and a causal mask among them cut from the model's own mask. Tokens that come later (generation
with the cache, or a continuation) get their usual positions after the whole prompt, and their mask in layers K..
is the model's mask with the pruned prompt columns taken out. The handle remembers, per cache object, which
prompt columns its layers K.. still hold.
"""

from __future__ import annotations

import math
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from prunekit.adapters import ADAPTERS, Adapter
from prunekit.errors import PrunekitError

DECODER_METHODS = ("fastv", "random")
FAMILIES = ("llama", "qwen3", "olmo2")  # adapters whose blocks take one causal mask and rotary embeddings
DEFAULT_LAYER = 2  # FastV's K = 2 (Chen et al. 2024, Sec. 5)
_INSTALLED = "_prunekit_tokens"
_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # the mask is a tensor (or None) whose columns can be cut


def uninstall(handle: object, hooks: list, blocks) -> None:
    """Remove `handle`'s hooks and give each block it installed on its class's forward back (a block installed by
    another handle keeps that one)."""
    for hook in hooks:
        hook.remove()
    hooks.clear()
    for block in blocks:
        if getattr(block, _INSTALLED, None) is handle:
            del block.forward
            delattr(block, _INSTALLED)


@dataclass
class _Prompt:
    """The prompt columns that layers K.. hold, for one cache (or one cache-less forward pass)."""

    index: torch.Tensor  # (B, n) kept prompt columns in order, filler first in shorter rows, -1 on filler
    length: int  # prompt columns T of the pass that pruned


@dataclass
class _Pass:
    """What layers K.. replace in the current forward pass."""

    prompt: _Prompt
    prefill: bool  # this pass pruned: its hidden states are the kept tokens, whose arguments are cut here
    attention_mask: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None


class DecoderTokenHandle:
    """FastV (or random prompt-token dropping) installed on a decoder LLM; `remove()` restores it exactly.

    After a forward pass that pruned a prompt: `kept` (B,) the prompt tokens each example kept, `kept_index` (B, n)
    their columns in the input, in order (-1 on the filler that pads shorter rows of a batch on the left).
    A cache filled while the handle was installed only fits the installed model: finish generating before
    `remove()`.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, adapter: Adapter, method: str, layer: int,
                 r: int | None, keep: float | None, feather: bool, seed: int):
        self.model = model
        self.method = method
        self.layer = layer
        self.r = r
        self.keep = keep
        self.feather = feather
        self.seed = seed
        self._blocks = blocks
        self._adapter = adapter
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._pass: _Pass | None = None
        self._last: _Prompt | None = None
        self.installed = False  # False when K is past the last layer: every layer sees the whole prompt

    @property
    def kept(self) -> torch.Tensor:
        return (self._last_prompt().index >= 0).sum(1)

    @property
    def kept_index(self) -> torch.Tensor:
        return self._last_prompt().index

    def remove(self) -> None:
        """Take FastV off: the blocks get their class's forward back, the hooks go, and the remembered caches."""
        uninstall(self, self._hooks, self._blocks)
        self._caches = weakref.WeakKeyDictionary()
        self._pass = None
        self.installed = False

    def _last_prompt(self) -> _Prompt:
        if self._last is None:
            raise PrunekitError("no forward pass has pruned a prompt with FastV installed yet")
        return self._last

    def _install(self) -> None:
        if self.layer >= len(self._blocks):
            return  # no layer after the last one: every layer sees the whole prompt, nothing to install
        ranking = self._blocks[self.layer - 1]
        query, key = _query_key_modules(self._adapter, ranking)
        self._hooks.append(query.register_forward_hook(self._capture("query")))
        self._hooks.append(key.register_forward_hook(self._capture("key")))
        for index in range(self.layer - 1, len(self._blocks)):
            block = self._blocks[index]
            forward = _ranking_forward(self) if index == self.layer - 1 else _pruned_forward(self)
            block.forward = types.MethodType(forward, block)
            setattr(block, _INSTALLED, self)
        self.installed = True

    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._captured[name] = output
        return hook

    def _kept_count(self, real: torch.Tensor) -> torch.Tensor:
        """(B,) prompt tokens each example keeps: ceil(keep * n) or n - r of its n real tokens, at least one."""
        count = real.sum(1)
        if self.r is not None:
            return (count - self.r).clamp(min=1)
        # The tolerance keeps 0.07 * 100 = 7.000000000000001 from rounding up a whole token.
        return torch.ceil(self.keep * count.double() - 1e-9).long().clamp(min=1)

    def _scores(self, block: nn.Module, real: torch.Tensor, position_embeddings) -> torch.Tensor:
        """(B, T) the ranking criterion of each prompt token (higher is kept)."""
        query, key = self._captured.pop("query"), self._captured.pop("key")
        if self.method == "random":
            # Indexed by rank among the real tokens, so an example draws the same tokens alone as in a padded batch.
            generator = torch.Generator().manual_seed(self.seed)
            draws = torch.rand(real.shape[1], generator=generator).to(real.device)
            return draws[(real.long().cumsum(1) - 1).clamp_min(0)]
        attention = _attention_module(self._adapter, block)
        batch, length = real.shape
        head_dim = attention.head_dim
        query = query.reshape(batch, length, -1, head_dim).transpose(1, 2)  # (B, H, T, d)
        key = key.reshape(batch, length, -1, head_dim).transpose(1, 2)  # (B, KV, T, d)
        rotate = not self.feather and getattr(attention, "use_rope", True)  # SmolLM3 has layers without rotary
        return last_token_attention(query, key, real, attention.scaling,
                                    position_embeddings if rotate else None)

    def _rank(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """After the ranking layer (K-1) ran on the whole prompt: choose the kept tokens, cut its output `hidden` to
        them, and cut the arguments that layers K.. receive in this pass."""
        mask = kwargs.get("attention_mask")
        real = _real_prompt(mask, hidden)
        scores = self._scores(block, real, kwargs.get("position_embeddings"))
        count = self._kept_count(real)
        index = top_tokens(scores, real, count)
        prompt = _Prompt(index=index, length=real.shape[1])
        self._last = prompt
        if bool((count == real.sum(1)).all()):
            return hidden  # keep = 1, or r = 0: no real token goes, so no layer changes
        gather = index.clamp_min(0)  # filler reads column 0, padding in every row that has filler
        state = _Pass(prompt=prompt, prefill=True)
        if mask is not None:
            mask = mask.expand(len(index), *mask.shape[1:])
            rows = gather.view(len(index), 1, -1, 1).expand(-1, mask.shape[1], -1, mask.shape[-1])
            mask = mask.gather(2, rows)
            state.attention_mask = mask.gather(3, gather.view(len(index), 1, 1, -1).expand(*mask.shape[:3], -1))
        cos, sin = kwargs["position_embeddings"]
        state.position_embeddings = (_gather_tokens(cos, gather), _gather_tokens(sin, gather))
        if kwargs.get("position_ids") is not None:
            state.position_ids = _gather_tokens(kwargs["position_ids"], gather)
        self._pass = state
        cache = kwargs.get("cache")
        if cache is not None:
            self._caches[cache] = prompt
        return _gather_tokens(hidden, gather)


def last_token_attention(query: torch.Tensor, key: torch.Tensor, real: torch.Tensor, scaling: float,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(B, T) the attention each token receives from the last one, averaged over heads (FastV's criterion).

    query (B, H, T, d) and key (B, KV, T, d) before the rotary embedding (H a multiple of KV, grouped-query
    attention), real (B, T) the tokens that may be attended to, position_embeddings (cos, sin) each (B or 1, T, d)
    to rotate them as the layer does (Su et al. 2021, rotate-half form), or None for FEATHER's un-rotated criterion.
    """
    query = query[:, :, -1:]
    if position_embeddings is not None:
        cos, sin = (t.unsqueeze(1).to(query.dtype) for t in position_embeddings)
        query = query * cos[:, :, -1:] + _rotate_half(query) * sin[:, :, -1:]
        key = key * cos + _rotate_half(key) * sin
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = (query @ key.transpose(2, 3)).squeeze(2).float() * scaling  # (B, H, T)
    logits = logits.masked_fill(~real.unsqueeze(1), -torch.inf)
    return logits.softmax(dim=-1).mean(dim=1)


def top_tokens(scores: torch.Tensor, real: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The `count[b]` real tokens of highest score in each row, the last token always among them, in their order.

    Returns (B, n) columns, n = max(count), shorter rows filled with -1 on the left (where left padding is).
    Ties go to the earlier token.
    """
    length = real.shape[1]
    scores = scores.masked_fill(~real, -torch.inf)
    scores[:, -1] = torch.inf
    order = torch.sort(-scores, dim=1, stable=True).indices
    chosen = torch.zeros_like(real).scatter_(1, order, torch.arange(length, device=real.device).expand_as(order)
                                             < count.unsqueeze(1))
    columns = torch.where(chosen, torch.arange(length, device=real.device), -1)
    return torch.sort(columns, dim=1).values[:, length - int(count.max()):]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B or 1, T, ...) at columns index (B, n) along dimension 1."""
    tensor = tensor.expand(len(index), *tensor.shape[1:])
    return tensor.gather(1, index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:]))


def _real_prompt(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T) the prompt tokens the last token may attend to, from the layer's mask: None (no padding), boolean
    (sdpa: True attends) or additive float (eager: 0 attends). The last token must be real (left padding)."""
    batch, length = hidden.shape[:2]
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
    row = mask[:, 0, -1, :]
    real = (row if row.dtype == torch.bool else row == 0).expand(batch, length)
    if not bool(real[:, -1].all()):
        raise PrunekitError("FastV ranks prompt tokens by the attention from the last one, so batches must be "
                            "left-padded (tokenizer.padding_side = 'left'); got a row whose last token is padding")
    return real


def _cut_columns(mask: torch.Tensor, prompt: _Prompt) -> torch.Tensor:
    """The model's mask (B or 1, 1, q, prompt + later) with only the kept prompt columns (and all later ones)."""
    batch = len(prompt.index)
    later = torch.arange(prompt.length, mask.shape[-1], device=mask.device).expand(batch, -1)
    columns = torch.cat([prompt.index.clamp_min(0), later], dim=1)
    mask = mask.expand(batch, *mask.shape[1:])
    return mask.gather(3, columns.view(batch, 1, 1, -1).expand(*mask.shape[:3], -1))


def _ranking_forward(handle: DecoderTokenHandle):
    """Layer K-1: runs on the whole input; on a prompt (an empty or no cache) its output keeps the top tokens."""

    def forward(block: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        cache = kwargs.get("cache")
        handle._pass = None
        handle._captured.clear()
        fresh = cache is None or cache.get_seq_length(handle.layer - 1) == 0
        if fresh and cache is not None and not isinstance(cache, DynamicCache):
            raise PrunekitError(f"FastV needs a DynamicCache (its later layers hold fewer tokens); got "
                                f"{type(cache).__name__}")
        output = type(block).forward(block, hidden_states, **kwargs)
        if fresh:
            return handle._rank(block, output, kwargs)
        handle._captured.clear()
        prompt = handle._caches.get(cache)
        if prompt is not None:
            handle._pass = _Pass(prompt=prompt, prefill=False)
        return output

    return forward


def _pruned_forward(handle: DecoderTokenHandle):
    """Layers K..: the kept tokens' mask, rotary embeddings and positions in the pass that pruned; the model's mask
    without the pruned prompt columns in later passes over the same cache."""

    def forward(block: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        state = handle._pass
        if state is not None:
            if state.prefill:
                kwargs["attention_mask"] = state.attention_mask
                kwargs["position_embeddings"] = state.position_embeddings
                if "position_ids" in kwargs:
                    kwargs["position_ids"] = state.position_ids
            elif kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = _cut_columns(kwargs["attention_mask"], state.prompt)
        return type(block).forward(block, hidden_states, **kwargs)

    return forward


def _attention_module(adapter: Adapter, block: nn.Module) -> nn.Module:
    return block.get_submodule(adapter.attention[0].rpartition(".")[0])


def _query_key_modules(adapter: Adapter, block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are the layer's queries and keys before the rotary embedding: the q/k norms
    where the family has them (Qwen 3, OLMo 2), else the projections."""
    q_proj, k_proj = adapter.attention[:2]
    norms = {name.rpartition(".")[2]: name for name in adapter.norms}
    return (block.get_submodule(norms.get("q_norm", q_proj)), block.get_submodule(norms.get("k_norm", k_proj)))


def check_decoder(model: nn.Module, adapter: Adapter, method: str) -> None:
    """Refuse what FastV cannot serve, before anything is installed."""
    if method not in DECODER_METHODS:
        raise PrunekitError(f"method {method!r} supports BERT-style encoders and prunekit.nets.VisionTransformer; "
                            f"for decoder LLMs ({type(model).__name__}) use one of: {', '.join(DECODER_METHODS)}")
    if adapter.family not in FAMILIES:
        supported = sorted(t for a in ADAPTERS if a.family in FAMILIES for t in a.model_types)
        raise PrunekitError(f"FastV supports Llama-style decoders (model types {', '.join(supported)}); got "
                            f"{type(model).__name__} (family {adapter.family!r})")
    config = model.config
    implementation = config._attn_implementation
    if implementation not in _ATTENTION_IMPLEMENTATIONS:
        raise PrunekitError(f"FastV cuts the attention mask, which attention implementation {implementation!r} does "
                            f"not take as a tensor; load the model with attn_implementation 'eager' or 'sdpa'")
    layer_types = getattr(config, "layer_types", None)
    windowed = (any(t != "full_attention" for t in layer_types) if layer_types is not None
                else getattr(config, "sliding_window", None) is not None)
    if windowed:
        raise PrunekitError(f"FastV needs full attention in every layer (a sliding window counts positions the "
                            f"pruned cache no longer has); {type(model).__name__} has sliding-window layers")


def check_options(layer: int, r: int | None, keep: float | None) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise PrunekitError(f"layer must be an integer >= 1 (FastV's K: the layers that see the whole prompt), "
                            f"got {layer!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep)
                             or not 0 < keep <= 1):
        raise PrunekitError(f"keep must be a fraction in (0, 1] of the prompt tokens kept, got {keep!r}")

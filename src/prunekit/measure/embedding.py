"""Fidelity of an encoder after pruning: how close its sentence embeddings stay to the dense model's.

Perplexity does not apply to a bidirectional encoder. A sentence encoder such as all-MiniLM-L6-v2 is used through
its embeddings, so what pruning must preserve is the direction of each text's embedding: the measure is the cosine
similarity between the dense and the pruned model's embedding of the same text, averaged over a fixed set of texts.
Embeddings follow the sentence-transformers recipe of `prunekit.data.embed` (mean pooling over the attention mask,
then L2 normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError


def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
                        max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of `texts` from a Hugging Face encoder, float32 [len(texts), hidden],
    in input order; texts are truncated to `max_length` tokens (256: all-MiniLM-L6-v2's sentence-transformers
    setting). The model runs in eval mode (its mode is restored) on the CPU, where it must be."""
    from prunekit.data.embed import Encoder, embed_texts

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise PrunekitError(f"sentence_embeddings runs on the CPU, but the model is on {device}; move it with "
                            "model.cpu() first")
    was_training = model.training
    model.eval()
    try:
        out = embed_texts(texts, Encoder(model=model, tokenizer=tokenizer, source=type(model).__name__),
                          batch_size=batch_size, max_length=max_length, progress=progress)
    finally:
        model.train(was_training)
    return torch.from_numpy(out)


def final_hidden(output) -> torch.Tensor:
    """The last block's hidden states [batch, seq, hidden] from an encoder's output: `last_hidden_state` of a base
    model (BertModel), else the last of `hidden_states` (a task model such as BertForMaskedLM, called with
    output_hidden_states=True)."""
    last = getattr(output, "last_hidden_state", None)
    return last if last is not None else output.hidden_states[-1]


def window_embeddings(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """L2-normalised mean-pooled final hidden states of full token windows [n, seq_len] (no padding), float32
    [n, hidden] on the CPU: the sentence embedding of each calibration window, computed where the model is."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in ids.split(batch_size):
            output = model(input_ids=batch.to(device), output_hidden_states=True)
            out.append(nn.functional.normalize(final_hidden(output).float().mean(1), dim=-1).cpu())
    return torch.cat(out)


def embedding_fidelity(dense_embeddings: torch.Tensor | np.ndarray,
                       pruned_embeddings: torch.Tensor | np.ndarray) -> dict:
    """Cosine similarity of each pruned embedding to the dense embedding of the same text (rows paired):
    `{"mean_cosine", "min_cosine", "texts"}`. 1.0 means the pruned encoder points every text the same way."""
    dense, pruned = torch.as_tensor(dense_embeddings), torch.as_tensor(pruned_embeddings)
    if dense.dim() != 2 or dense.shape != pruned.shape or len(dense) == 0:
        raise PrunekitError(f"embeddings of shapes {tuple(dense.shape)} and {tuple(pruned.shape)} cannot be "
                            "compared; pass two [texts, dim] arrays of the same texts, same shape")
    cosine = nn.functional.cosine_similarity(dense.double(), pruned.double(), dim=1)
    if not torch.isfinite(cosine).all():
        raise PrunekitError("non-finite cosine similarity: an embedding is zero or holds NaN/inf")
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()), "texts": len(cosine)}

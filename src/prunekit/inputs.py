"""What every pruning entry point checks and prepares from its inputs, in one place: sequence lengths against the
model, calibration tokens (with a tokenizer and within the vocabulary), evaluation windows, and the model card of
the protocol. `prunekit.prune`, `prune_structure`, `prune_depth` and `evaluate` all use these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunekit.assets import text_asset_names
from prunekit.corpus import TokenSet, calibration_tokens, evaluation_windows, load_texts
from prunekit.errors import PrunekitError
from prunekit.measure import protocol
from prunekit.measure.embedding import embedding_fidelity, sentence_embeddings, window_embeddings


def max_positions(config) -> int | None:
    """The longest sequence a model's positions cover (absolute embeddings or its stated rotary range)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_lengths(
    model: nn.Module | str | Path, *, calibration_seq_len: int | None = None, eval_seq_len: int | None = None,
    batch_size: int = 1,
) -> None:
    """Refuse sequence lengths beyond the model's positions, and batch sizes below 1, before any work.

    `model` is a loaded model or a source (asset name, local directory): a source's config is read without
    loading weights, and the check is skipped when no config is at hand yet (an asset not yet converted).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PrunekitError(f"batch size {batch_size!r} must be an integer >= 1")
    if isinstance(model, nn.Module):
        config = getattr(model, "config", None)
    else:
        from prunekit.assets import model_config

        config = model_config(model)
    limit = None if config is None else max_positions(config)
    for what, length in (("calibration", calibration_seq_len), ("evaluation", eval_seq_len)):
        if length is None:
            continue
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise PrunekitError(f"{what} sequence length {length!r} must be an integer >= 2")
        if limit is not None and length > limit:
            raise PrunekitError(f"{what} sequence length {length} exceeds the model's {limit} positions; "
                                f"use at most {limit}")


def check_run_lengths(model: nn.Module, calibration, calibration_seq_len: int, evaluation, eval_seq_len: int,
                      batch_size: int) -> None:
    """`check_lengths` for a pruning call: a calibration or evaluation given as a token tensor has its own length,
    so only the lengths of text sources (asset names, files) are checked."""
    check_lengths(model, calibration_seq_len=None if isinstance(calibration, torch.Tensor) else calibration_seq_len,
                  eval_seq_len=None if evaluation is None or isinstance(evaluation, torch.Tensor) else eval_seq_len,
                  batch_size=batch_size)


def _check_tokenizer(tokenizer, source, what: str) -> None:
    if tokenizer is None and not isinstance(source, torch.Tensor):
        raise PrunekitError(f"{what} from text needs a tokenizer; pass tokenizer= or a tensor of token ids")


def calibration_set(model: nn.Module, tokenizer, calibration, *, samples: int, seq_len: int, seed: int) -> TokenSet:
    """The calibration tokens (see `corpus.calibration_tokens`), refused when they do not fit the model's vocabulary."""
    _check_tokenizer(tokenizer, calibration, "calibration")
    calib = calibration_tokens(tokenizer, calibration, samples=samples, seq_len=seq_len, seed=seed)
    if calib.ids.max() >= model.get_input_embeddings().num_embeddings:
        raise PrunekitError("calibration token ids exceed the model's vocabulary: wrong tokenizer?")
    return calib


def evaluation_set(tokenizer, data, *, seq_len: int, windows: int | None) -> TokenSet:
    """The evaluation windows (see `corpus.evaluation_windows`), tokenized once for the dense and pruned model."""
    _check_tokenizer(tokenizer, data, "evaluation")
    return evaluation_windows(tokenizer, data, seq_len=seq_len, max_windows=windows)


@dataclass
class EncoderEvaluation:
    """Held-out texts an encoder is judged on, with a reference model's sentence embeddings of them: perplexity does
    not apply to a bidirectional encoder, so a pruned or healed one is measured by how close its embeddings stay to
    the reference (the dense model) on the same texts (`prunekit.measure.embedding`). Token windows given as a
    tensor (`ids`) are embedded as they are, without a tokenizer."""

    texts: list[str] | None
    max_length: int
    info: dict
    reference: torch.Tensor = field(repr=False)
    ids: torch.Tensor | None = field(default=None, repr=False)

    def embeddings(self, model: nn.Module, tokenizer) -> torch.Tensor:
        if self.ids is not None:
            return window_embeddings(model, self.ids)
        return sentence_embeddings(model, tokenizer, self.texts, max_length=self.max_length)

    def fidelity(self, model: nn.Module, tokenizer) -> dict:
        """`embedding_fidelity` of `model`'s embeddings of the texts against the reference's."""
        return embedding_fidelity(self.reference, self.embeddings(model, tokenizer))


def encoder_evaluation_set(reference: nn.Module, tokenizer, evaluation, *, texts: int | None,
                           max_length: int) -> EncoderEvaluation:
    """The first `texts` documents (all if None) of a text asset's held-out split, or of a local file or list of
    strings, truncated to `max_length` tokens, and `reference`'s embeddings of them (it runs on the CPU); or the
    first `texts` rows of a tensor of token windows, embedded as they are."""
    if isinstance(evaluation, torch.Tensor):
        ids = evaluation[:texts]
        info = {"source": f"{len(ids)} given token windows", "split": None, "texts": len(ids),
                "max_length": ids.shape[-1], "metric": "mean cosine to dense embeddings"}
        return EncoderEvaluation(None, ids.shape[-1], info, window_embeddings(reference, ids), ids)
    _check_tokenizer(tokenizer, evaluation, "evaluation")
    split = "test" if isinstance(evaluation, str) and evaluation in text_asset_names() else None
    documents = load_texts(evaluation, split=split)[:texts]
    source = evaluation if isinstance(evaluation, str) else f"{len(documents)} given texts"
    info = {"source": source, "split": split, "texts": len(documents), "max_length": max_length,
            "metric": "mean cosine to dense embeddings"}
    return EncoderEvaluation(documents, max_length, info,
                             sentence_embeddings(reference, tokenizer, documents, max_length=max_length))


def compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to compute on: `device` checked (a torch device, CUDA present), or where the model is."""
    if device is None:
        return next(model.parameters()).device
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise PrunekitError(f"device '{device}' is not a torch device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(f"device '{device}' was requested but CUDA is not available here")
    return resolved


def model_card(model: nn.Module, source: str | None, *, weights_sha256: str | None = None) -> dict:
    """The model part of the protocol card: where it came from, its class and type, weight hash and size.
    `weights_sha256`, when the caller has just hashed the weights (`measure.protocol.weight_facts`), is used as
    given instead of hashing again."""
    config = getattr(model, "config", None)
    return {
        "source": source or getattr(config, "_name_or_path", None) or type(model).__name__,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "weights_sha256": weights_sha256 or protocol.weights_sha256(model),
        # each shared Parameter once; reading no values, so an offloaded model's blocks are not read again
        "parameters": sum(p.numel() for p in dict(model.named_parameters()).values()),
    }

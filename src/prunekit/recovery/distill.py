"""Knowledge distillation from the dense model: logit KL with a temperature for a causal LM, sentence-embedding
cosine for an encoder, either optionally with hidden-state matching.

For a causal LM (`distill="logits"` or `"logits+hidden"`) the loss of a batch is

    (1 − α) · CE(student) + α · (T² · KL(p_teacher,T ‖ p_student,T) + H)

(Hinton et al. 2015: the T² keeps the gradient scale of the soft term independent of T). H, with
`distill="logits+hidden"`, is the mean over matched layers of the relative squared error
‖h_student − h_teacher‖² / ‖h_teacher‖²: relative, because LLM hidden states carry a few huge "massive activations"
that would otherwise make the deepest layers the whole loss.

An encoder has no next-token loss to mix with, and is used through its sentence embeddings: with
`distill="embedding"` (or `"embedding+hidden"`, adding H) the loss is the mean over windows of
1 − cos(e_student, e_teacher), e the mean-pooled final hidden states of the window (the sentence-transformers
embedding, before its L2 normalisation, which the cosine ignores).

Matching layers. Hidden state i is the output of block i (1-based; the last one after the final norm, as Hugging
Face returns it). When the student kept every block, student i matches teacher i. A depth-pruned student matches
the teacher block it was: `layer_map[j]` is the teacher index of student block j (0-based), e.g. the `kept_blocks`
of `prunekit.prune_depth`'s record. Without a map the match is proportional, student i ↔ teacher round(i·Lt/Ls),
which pairs the last blocks and spreads the rest evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.measure.embedding import final_hidden

CAUSAL_DISTILL_MODES = ("logits", "logits+hidden")
ENCODER_DISTILL_MODES = ("embedding", "embedding+hidden")
DISTILL_MODES = CAUSAL_DISTILL_MODES + ENCODER_DISTILL_MODES


def layer_pairs(student_blocks: int, teacher_blocks: int,
                layer_map: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices to match (see the module docstring), checked."""
    if layer_map is None:
        return [(i, round(i * teacher_blocks / student_blocks)) for i in range(1, student_blocks + 1)]
    indices = list(layer_map)
    if (len(indices) != student_blocks or any(not isinstance(i, int) or not 0 <= i < teacher_blocks for i in indices)
            or indices != sorted(set(indices))):
        raise PrunekitError(f"layer_map {indices!r} must list, for each of the student's {student_blocks} blocks, an "
                            f"increasing teacher block index in [0, {teacher_blocks})")
    pairs = [(j + 1, t + 1) for j, t in enumerate(indices)]
    # the last hidden state is taken after the final norm: pair it with the teacher's last, also normed
    pairs[-1] = (student_blocks, teacher_blocks)
    return pairs


def check_distill_mode(distill: str, causal: bool) -> None:
    """A causal LM distils logits, an encoder its embeddings."""
    modes, kind = (CAUSAL_DISTILL_MODES, "a causal LM") if causal else (ENCODER_DISTILL_MODES, "an encoder")
    if distill not in modes:
        raise PrunekitError(f"distill={distill!r} does not apply to {kind}; use one of {', '.join(modes)}")


def check_teacher(student: nn.Module, teacher: nn.Module, distill: str) -> None:
    """The teacher must read the same vocabulary, and, for hidden-state matching or embedding distillation (whose
    cosine compares the two models' vectors), have the same hidden width."""
    s_vocab = student.get_input_embeddings().num_embeddings
    t_vocab = teacher.get_input_embeddings().num_embeddings
    if s_vocab != t_vocab:
        raise PrunekitError(f"the teacher reads {t_vocab} tokens and the student {s_vocab}; distill from the "
                            f"model the student was pruned from")
    widths = student.config.hidden_size, teacher.config.hidden_size
    if distill != "logits" and widths[0] != widths[1]:
        instead = ": use distill='logits'" if distill == "logits+hidden" else ""
        raise PrunekitError(f"distill={distill!r} needs equal hidden sizes; student {widths[0]}, teacher "
                            f"{widths[1]}{instead}")


def _hidden_error(s_out, t_out, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """H: the mean over `pairs` of the relative squared error of the student's hidden state to the teacher's."""
    errors = [(s_out.hidden_states[s].float() - t_out.hidden_states[t].float()).pow(2).sum()
              / t_out.hidden_states[t].float().pow(2).sum().clamp_min(1e-12) for s, t in pairs]
    return torch.stack(errors).mean()


def distillation_loss(teacher: nn.Module, *, temperature: float, alpha: float,
                      pairs: list[tuple[int, int]] | None = None):
    """A `loss_fn(model, ids)` for `train_on_windows` that distills `teacher` (frozen, eval mode) into the model;
    `pairs` (from `layer_pairs`) adds hidden-state matching."""
    hidden = pairs is not None

    def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        s_out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        vocab = s_out.logits.shape[-1]
        s_logits = s_out.logits[:, :-1].reshape(-1, vocab).float()
        t_logits = t_out.logits[:, :-1].reshape(-1, vocab).float()
        ce = F.cross_entropy(s_logits, ids[:, 1:].reshape(-1))
        kl = F.kl_div(F.log_softmax(s_logits / temperature, dim=-1), F.log_softmax(t_logits / temperature, dim=-1),
                      log_target=True, reduction="batchmean")
        soft = temperature**2 * kl
        if hidden:
            soft = soft + _hidden_error(s_out, t_out, pairs)
        return (1 - alpha) * ce + alpha * soft

    return loss_fn


def embedding_distillation_loss(teacher: nn.Module, *, pairs: list[tuple[int, int]] | None = None):
    """A `loss_fn(model, ids)` for `train_on_windows` that distils an encoder `teacher` (frozen, eval mode) into the
    model by the cosine of their sentence embeddings of each window; `pairs` (from `layer_pairs`) adds H."""

    def loss_fn(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=True)
        s_out = model(input_ids=ids, output_hidden_states=True)
        cosine = F.cosine_similarity(final_hidden(s_out).float().mean(1), final_hidden(t_out).float().mean(1), dim=-1)
        loss = (1.0 - cosine).mean()
        return loss + _hidden_error(s_out, t_out, pairs) if pairs is not None else loss

    return loss_fn

"""Knowledge distillation from the dense model: logit KL with a temperature, optionally hidden-state matching.

The loss of a batch is

    (1 − α) · CE(student) + α · (T² · KL(p_teacher,T ‖ p_student,T) + H)

(Hinton et al. 2015: the T² keeps the gradient scale of the soft term independent of T). H, with
`distill="logits+hidden"`, is the mean over matched layers of the relative squared error
‖h_student − h_teacher‖² / ‖h_teacher‖²: relative, because LLM hidden states carry a few huge "massive activations"
that would otherwise make the deepest layers the whole loss.

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

DISTILL_MODES = ("logits", "logits+hidden")


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


def check_teacher(student: nn.Module, teacher: nn.Module, hidden: bool) -> None:
    """The teacher must predict the same vocabulary (and, for hidden matching, have the same hidden width)."""
    s_vocab, t_vocab = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise PrunekitError(f"the teacher predicts {t_vocab} tokens and the student {s_vocab}; distill from the "
                            f"model the student was pruned from")
    if hidden and student.config.hidden_size != teacher.config.hidden_size:
        raise PrunekitError(f"hidden-state distillation needs equal hidden sizes; student "
                            f"{student.config.hidden_size}, teacher {teacher.config.hidden_size}: use distill='logits'")


def distillation_loss(teacher: nn.Module, *, temperature: float, alpha: float,
                      pairs: list[tuple[int, int]] | None = None):
    """A `loss_fn(model, ids)` for `train_causal_lm` that distills `teacher` (frozen, eval mode) into the model;
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
            errors = [(s_out.hidden_states[s].float() - t_out.hidden_states[t].float()).pow(2).sum()
                      / t_out.hidden_states[t].float().pow(2).sum().clamp_min(1e-12) for s, t in pairs]
            soft = soft + torch.stack(errors).mean()
        return (1 - alpha) * ce + alpha * soft

    return loss_fn

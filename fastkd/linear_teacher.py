"""``fastkd.LinearTeacher``: a teacher given by its last hidden states and output head.

``fastkd.linear_kd_loss`` computes the teacher's logits ``hidden @ weight.T + bias`` a chunk of
rows at a time, next to the student's, so neither model's ``[N, C]`` logits are ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True, eq=False)
class LinearTeacher:
    """A teacher whose logits are ``hidden @ weight.T + bias`` (a language model's output head).

    Args:
        hidden: ``[..., H_t]`` float tensor, the teacher's last hidden states; the leading dims
            are the student's (``[B, L, H_t]`` for ``[B, L, H]`` student hidden states).
        weight: ``[C, H_t]`` head weight, in ``hidden``'s dtype (bf16 weights multiply with
            float32 accumulation).
        bias: optional ``[C]`` head bias, in ``hidden``'s dtype.

    The teacher is never differentiated: its tensors are read detached.

    Example::

        with torch.no_grad():
            t_hidden = teacher.model(input_ids).last_hidden_state
        top = fastkd.LinearTeacher(t_hidden, teacher.lm_head.weight)
        loss = fastkd.linear_kd_loss(s_hidden, student.lm_head.weight, top, labels)
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if x is None and name == "bias":
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"LinearTeacher {name} must be a torch.Tensor, got {type(x).__name__}"
                )
            if x.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"LinearTeacher {name} must be float32, bfloat16, float16 or float64, got "
                    f"{x.dtype}"
                )
        if weight.dim() != 2:
            raise ValueError(
                f"LinearTeacher weight must be 2-D [C, H_t], got shape {tuple(weight.shape)}"
            )
        if hidden.dim() == 0:
            raise ValueError("LinearTeacher hidden must be [..., H_t], got a 0-d tensor")
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"LinearTeacher hidden has H_t = {hidden.shape[-1]} features but weight "
                f"{tuple(weight.shape)} takes {weight.shape[1]} (mismatched H)"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"LinearTeacher bias must have shape ({weight.shape[0]},) (weight's C), got "
                f"{tuple(bias.shape)} (mismatched C)"
            )
        for name, x in (("weight", weight), ("bias", bias)):
            if x is None:
                continue
            if x.device != hidden.device:
                raise ValueError(
                    f"LinearTeacher {name} is on {x.device} but hidden is on {hidden.device}"
                )
            if x.dtype != hidden.dtype:
                raise TypeError(
                    f"LinearTeacher {name} must have hidden's dtype {hidden.dtype}, got {x.dtype}"
                )
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def shape(self) -> torch.Size:
        """The leading dims (the student hidden states' ``shape[:-1]``)."""
        return self.hidden.shape[:-1]

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    def __repr__(self) -> str:
        bias = "None" if self.bias is None else f"{tuple(self.bias.shape)}"
        return (
            f"LinearTeacher(hidden={tuple(self.hidden.shape)}, weight={tuple(self.weight.shape)}, "
            f"bias={bias}, dtype={self.hidden.dtype})"
        )

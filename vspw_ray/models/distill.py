"""Self-distillation (seed section 3.2): a frozen teacher of the same architecture regularises
the student through its per-pixel class distributions.

``loss = task losses + weight * T^2 * KL(teacher || student)`` over valid pixels, with both
distributions softened by the temperature ``T``. It works for every model that offers
``log_probs(images)`` and ``forward(images, targets, return_log_probs=True)``.
"""

from __future__ import annotations

import torch
from torch import nn

from vspw_ray.losses import IGNORE_INDEX, distill_kl

__all__ = ["SelfDistillation", "load_model_weights"]


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load a training checkpoint (``{"model": state_dict, ...}``) or a bare state dict, from a
    local file or an ``s3://``/``gs://`` URI."""
    from pathlib import Path

    from vspw_ray.models.backbone import read_checkpoint_file
    from vspw_ray.storage import is_uri

    if is_uri(path):
        from vspw_ray.checkpoints import read_state

        sd = read_state(path)
        sd = sd["model"] if isinstance(sd.get("model"), dict) else sd
    elif not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (model.init_checkpoint, "
                                f"loss.distill.teacher or --from)")
    else:
        sd = read_checkpoint_file(path)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit the model: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; "
                         f"was it trained with the same model section?")


class SelfDistillation(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, *, weight: float = 1.0,
                 temperature: float = 1.0, teacher_checkpoint: str | None = None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher_checkpoint:
            load_model_weights(self.teacher, teacher_checkpoint)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.weight, self.temperature = weight, temperature
        self.num_classes = student.num_classes

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher stays frozen, dropout and BN statistics included
        return self

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        losses, student = self.student(images, targets, return_log_probs=True)
        with torch.no_grad():
            teacher = self.teacher.log_probs(images)
        valid = targets != IGNORE_INDEX
        losses["loss_distill"] = self.weight * distill_kl(student, teacher, valid, self.temperature)
        return losses

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.log_probs(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student.predict(images)

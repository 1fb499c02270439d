"""The DINO loss: cross-entropy between the centred, sharpened teacher and the student, all pairs at once."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy summed over every (teacher global view, student view) pair of different views.

    The teacher temperature is passed in per step (schedules live outside). The center is an EMA of
    the batch mean of raw teacher logits, all-reduced across ranks when running distributed.
    """

    def __init__(self, out_dim: int, num_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Pair (teacher view t, student view s) counts unless s == t: 2 * (V - 1) pairs in all.
        mask = torch.ones(2, num_crops)
        mask[0, 0] = mask[1, 1] = 0
        self.register_buffer("pair_mask", mask, persistent=False)

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float | torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """student_out: [V*B, K] logits; teacher_out: [2*B, K] logits. Returns loss and collapse signals."""
        student_out = student_out.float()
        teacher_out = teacher_out.float()
        batch = teacher_out.shape[0] // 2
        log_p = torch.log_softmax(student_out / self.student_temp, dim=-1).view(self.num_crops, batch, -1)
        teacher_logits = ((teacher_out - self.center) / teacher_temp).view(2, batch, -1)
        q = torch.softmax(teacher_logits, dim=-1)
        # ce[t, s] = mean over the batch of -sum_k q_t log p_s: one contraction for every pair.
        ce = -torch.einsum("tbk,sbk->ts", q, log_p) / batch
        loss = (ce * self.pair_mask).sum() / self.pair_mask.sum()
        with torch.no_grad():
            log_q = torch.log_softmax(teacher_logits, dim=-1)
            entropy = -(q * log_q).sum(-1).mean()
            # KL(q_t || p_s) averaged over the same pairs: cross-entropy minus the teacher's entropy.
            kl = loss.detach() - entropy
        self.update_center(teacher_out)
        return loss, {"teacher_entropy": entropy, "kl": kl}

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.sum(dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():  # the center is the mean over every rank's batch
            dist.all_reduce(batch_sum)
            world_size = dist.get_world_size()
        batch_center = batch_sum / (teacher_out.shape[0] * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

"""The heads of one linear probe: one per learning rate of `linear.lr`, their SGD optimizers and
per-epoch histories — the single list of what a probe checkpoint holds, and which head is reported.

All heads train on the same frozen features in one pass (dino/eval/probe.py:probe_step); with a
single learning rate the checkpoint keeps the layout it had before lr grids (`head`, `optimizer`,
`history`), so probes saved then resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dino.eval.config import LinearConfig
from dino.eval.probe import build_head, cosine_lr


@dataclass
class ProbeHeads:
    lrs: list[float]
    """`linear.lr` as a list: the learning rates per 256 images."""
    heads: list[nn.Linear]
    optimizers: list[torch.optim.SGD]
    base_lrs: list[float]
    """Each head's learning rate for the batch size (lr * batch_size / 256), before the cosine."""
    histories: list[list[dict[str, float]]]
    """Each head's rows, one per finished epoch (loss, top-1/5, held-out top-1 for a grid)."""

    @classmethod
    def build(
        cls, lrs: list[float], lin: LinearConfig, dim: int, classes: int, seed: int, device: torch.device
    ) -> ProbeHeads:
        heads = [build_head(dim, classes, seed).to(device) for _ in lrs]
        base_lrs = [lr * lin.batch_size / 256 for lr in lrs]
        optimizers = [
            torch.optim.SGD(head.parameters(), lr=lr, momentum=lin.momentum, weight_decay=lin.weight_decay)
            for head, lr in zip(heads, base_lrs, strict=True)
        ]
        return cls(lrs, heads, optimizers, base_lrs, [[] for _ in lrs])

    def set_epoch(self, epoch: int, epochs: int) -> list[float]:
        """Set each optimizer's learning rate for `epoch` (cosine over `epochs`); returns them."""
        epoch_lrs = [cosine_lr(base, epoch, epochs) for base in self.base_lrs]
        for optimizer, lr in zip(self.optimizers, epoch_lrs, strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return epoch_lrs

    def state_dict(self) -> dict[str, Any]:
        if len(self.heads) == 1:
            return {
                "head": self.heads[0].state_dict(),
                "optimizer": self.optimizers[0].state_dict(),
                "history": self.histories[0],
            }
        return {
            "heads": [h.state_dict() for h in self.heads],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "histories": self.histories,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "heads" in state:
            saved = zip(state["heads"], state["optimizers"], state["histories"], strict=True)
        else:
            saved = [(state["head"], state["optimizer"], state["history"])]
        for i, (head_state, optimizer_state, history) in enumerate(saved):
            self.heads[i].load_state_dict(head_state, strict=True)
            self.optimizers[i].load_state_dict(optimizer_state)
            self.histories[i] = list(history)

    def chosen(self) -> int:
        """The reported head: the only one, or the lr whose final held-out accuracy is best (the
        first on ties) — never chosen on the test split."""
        if len(self.lrs) > 1 and self.histories[0]:
            return max(range(len(self.lrs)), key=lambda i: (self.histories[i][-1]["val_top1"], -i))
        return 0

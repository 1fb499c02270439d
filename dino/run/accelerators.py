"""Accelerator cards: a short name for a device (what runs, bench records and cost estimates match on)
and the dense peak each card can do, for model FLOP utilisation and FLOP-based time estimates.

Imports nothing heavy: the launcher's cost estimate reads it without torch; `device_card` imports
torch only when asked about a CUDA device.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by a substring of the device name, most specific
# first (a "GH200" is no "H200"). The V100 has no bf16: its figure is the fp16 tensor-core peak, which
# is what a half-precision run gets there.
PEAK_BF16 = {
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "V100": 125e12,
}
CPU = "cpu"


def card_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; 'cpu' -> 'cpu'; a card not in PEAK_BF16 keeps its full name."""
    if device_name.lower() == CPU:
        return CPU
    upper = device_name.upper()
    return next((card for card in PEAK_BF16 if card in upper), device_name)


def find_card(text: str) -> str:
    """A known card named anywhere in `text` (a SLURM constraint, partition or gres), or ""."""
    upper = text.upper()
    return next((card for card in PEAK_BF16 if card in upper), "")


def device_card(device) -> str:
    """The card of a torch device: its short name, or 'cpu'."""
    if device.type != "cuda":
        return CPU
    import torch

    return card_name(torch.cuda.get_device_name(device))

"""The DINO paper's published numbers (ImageNet-1k; `../shared/ANCHORS.md`), keyed by ablation axis
and value, for `dinolab report --paper`. Each entry says which table and schedule it comes from: our
runs are usually shorter, so the numbers are context, not targets."""

from __future__ import annotations

# axis -> value -> (k-NN top-1, linear top-1, source); None where the paper gives no number.
PAPER: dict[str, dict[object, tuple[float | None, float | None, str]]] = {
    "crops.num_local": {
        0: (None, 67.8, "Table 8, ViT-S/16, 100 ep"),
        2: (None, 71.5, "Table 8, ViT-S/16, 100 ep"),
        6: (None, 73.8, "Table 8, ViT-S/16, 100 ep"),
        10: (None, 74.6, "Table 8, ViT-S/16, 100 ep"),
    },
    "model.patch_size": {
        16: (74.5, 77.0, "Table 2, ViT-S/16, full schedule"),
        8: (78.3, 79.7, "Table 2, ViT-S/8, full schedule"),
    },
    "teacher.temp": {
        0.02: (66.7, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.04: (69.6, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.06: (68.7, None, "teacher temperature, ViT-S/16, 100 ep"),
        0.08: (0.1, None, "teacher temperature, ViT-S/16, 100 ep (collapse)"),
    },
    "teacher.center_momentum": {
        0.0: (69.1, None, "center momentum, ViT-S/16, 100 ep"),
        0.9: (69.7, None, "center momentum, ViT-S/16, 100 ep"),
        0.999: (0.1, None, "center momentum, ViT-S/16, 100 ep (collapse)"),
    },
    "teacher.momentum": {
        0.0: (0.1, 0.1, "Table 7, no momentum teacher (collapse), 300 ep"),
        0.996: (72.8, 76.1, "Table 7, DINO ViT-S/16, 300 ep"),
    },
}


def lookup(axis: str, value: object) -> tuple[float | None, float | None, str] | None:
    table = PAPER.get(axis, {})
    for key, numbers in table.items():
        try:
            if float(key) == float(value):  # 0.9 == "0.9", 2 == 2.0
                return numbers
        except (TypeError, ValueError):
            if key == value:
                return numbers
    return None

"""The DINO method: tensors in, tensors out (no I/O, no Hydra, nothing of the run).

Entry points: `build_student_teacher` (timm backbone + DINO head, each crop size through it once),
`DINOLoss`, `build_schedules` (learning rate, weight decay, teacher momentum and temperature),
`StepState` and `train_step` (one optimisation step), `MultiCropAugment`/`BatchMultiCrop` (the crops,
per image or per batch), `CollapseGuard` (stops a collapsed run).
"""

from dino import entry_points

__all__, __getattr__, __dir__ = entry_points(
    __name__,
    {
        "build_student_teacher": "dino.method.models",
        "DINOLoss": "dino.method.loss",
        "build_schedules": "dino.method.schedules",
        "StepState": "dino.method.step",
        "train_step": "dino.method.step",
        "MultiCropAugment": "dino.method.augment",
        "BatchMultiCrop": "dino.method.batch_augment",
        "CollapseGuard": "dino.method.collapse",
    },
)

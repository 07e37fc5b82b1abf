"""ImageNet-1k: a CNN teacher distilled into DeiT through its distillation token (DeiT's recipe):
ResNet-50 (torchvision layout) -> deit_small_distilled_patch16 (or `student=tiny`), hard distillation.

    python -m experiments.cifar --config=experiments/configs/imagenet_resnet50_deit.py:data_dir=/data/imagenet,teacher_weights=resnet50.safetensors
    python -m experiments.cifar --config=experiments/configs/imagenet_resnet50_deit.py:student=tiny,teacher_weights=resnet50.safetensors
    python -m experiments.cifar --config=experiments/configs/imagenet_resnet50_deit.py:smoke

Recipe (facebookresearch/deit main.py defaults with --distillation-type hard, as the paper
distils): 300 epochs, batch 1024, AdamW at lr 5e-4 x batch / 512 = 1e-3, weight decay 0.05, cosine
after 5 warm-up epochs, label smoothing 0.1, mixup 0.8, random-resized crop 224 + flip;
`distill.method=deit` with `deit.mode=hard`: 1/2 CE(class head, y) + 1/2 CE(distillation head,
the teacher's argmax). Differences from DeiT, said rather than hidden: DeiT's teacher is a
RegNetY-16GF (82.9 top-1), which kdjax does not have, so this takes torchvision's ResNet-50
(`teacher_weights=`, used as it is; `IMAGENET1K_V2` is 80.86 by torchvision's figure); DeiT also
switches between mixup 0.8 and CutMix 1.0 per batch and adds RandAugment, random erasing,
repeated augmentation and stochastic depth 0.1, which kdjax's ViT step does not do (one of
mixup or CutMix per run; no drop-path).

Published figures (the DeiT paper's, not ours): DeiT-S 79.8 top-1 alone and 81.2 distilled
(DeiT-S with the distillation token, RegNetY-16GF teacher); DeiT-Ti 72.2 and 74.5. The report gives
the class head's, the distillation head's and both heads' accuracy. Expected result here: not
measured (no ImageNet and no accelerator on the development machines).

Config-string arguments: `student=small|tiny` (default small), `data_dir=<ROOT>` (default
~/imagenet), `teacher_weights=<file>`, `method=<name>` (default deit), `seed=<int>`, `smoke` (the
real models at 224 for 3 steps per stage on a tiny generated folder).
"""

from experiments.configs import common

STUDENTS = ("small", "tiny")


def get_config(arg=None):
    c, a = common.imagenet_pair(arg, "resnet50_imagenet", "deit_small_distilled_patch16", method="deit",
                                extra_args={"student": "small"})
    if a.student not in STUDENTS:
        raise ValueError(f"unknown student {a.student!r}; choose one of: {', '.join(STUDENTS)}")
    c.student.model = f"deit_{a.student}_distilled_patch16"
    c.batch_size = 1024
    c.teacher.epochs = c.student.epochs = 300
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 5e-4 * c.batch_size / 512
    c.optimizer.weight_decay = 0.05
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_epochs = 5.0
    c.loss.label_smoothing = 0.1
    c.augment.mixup_alpha = 0.8
    c.distill.deit.mode = "hard"
    return common.imagenet_smoke(c, a)

"""ImageNet-1k: ResNet-50 teacher -> MobileNetV2 student (torchvision layouts), KD T=1, 0.5*CE + 0.5*KD.

    python -m experiments.cifar --config=experiments/configs/imagenet_resnet50_mobilenetv2.py:data_dir=/data/imagenet,teacher_weights=resnet50.safetensors
    python -m experiments.cifar --config=experiments/configs/imagenet_resnet50_mobilenetv2.py:smoke

Recipe: mdistiller's configs/imagenet/r50_mv2/kd.yaml: 100 epochs, batch 512, SGD momentum 0.9,
lr 0.2, x0.1 at epochs 30/60/90, weight decay 1e-4, KD with T=1 and CE and KD weighted 0.5 each;
random-resized crop 224 + flip on the loader workers, eval resize 256 + center crop 224. The
teacher: torchvision's ResNet-50 (`teacher_weights=`; `ResNet50_Weights.IMAGENET1K_V2` is 80.86
top-1 and `IMAGENET1K_V1` 76.13 by torchvision's figures; mdistiller's teacher is a 76.16 ResNet-50),
used as it is. Without it the teacher stage trains one from labels with the same recipe.

Published figures (the references' runs, not ours): mdistiller's README reports its ImageNet
ResNet-50 teacher with a MobileNet-V1 student (not this MobileNetV2): KD 70.50, DKD 72.05;
torchvision's MobileNetV2 trained alone is 71.88 (`MobileNet_V2_Weights.IMAGENET1K_V1`). Expected
result here: not measured (no ImageNet and no accelerator on the development machines).

Config-string arguments: `data_dir=<ROOT>` (default ~/imagenet), `teacher_weights=<file>`,
`method=<name>` (default kd), `seed=<int>`, `smoke` (the real models at 224 for 3 steps per stage
on a tiny generated folder).
"""

from experiments.configs import common


def get_config(arg=None):
    c, a = common.imagenet_pair(arg, "resnet50_imagenet", "mobilenetv2_imagenet")
    c.batch_size = 512
    c.teacher.epochs = c.student.epochs = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.2
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (30, 60, 90)
    c.optimizer.decay_factor = 0.1
    if a.method == "kd":
        c.distill.temperature = 1.0
        c.distill.ce_weight = 0.5
        c.distill.kd.weight = 0.5
    return common.imagenet_smoke(c, a)

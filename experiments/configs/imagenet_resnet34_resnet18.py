"""ImageNet-1k: ResNet-34 teacher -> ResNet-18 student (torchvision layouts), KD T=1, 0.5*CE + 0.5*KD.

    python -m experiments.cifar --config=experiments/configs/imagenet_resnet34_resnet18.py:data_dir=/data/imagenet,teacher_weights=resnet34.safetensors
    python -m experiments.cifar --config=experiments/configs/imagenet_resnet34_resnet18.py:smoke

Recipe (torchdistill's and mdistiller's ImageNet ResNet-34 -> ResNet-18; mdistiller
configs/imagenet/r34_r18/kd.yaml): 100 epochs, batch 256, SGD momentum 0.9, lr 0.1, x0.1 at epochs
30/60/90, weight decay 1e-4, random-resized crop 224 + flip on the loader workers, eval resize 256 +
center crop 224; KD with T=1 and CE and KD weighted 0.5 each. Both references start from
torchvision's pretrained ResNet-34 (`ResNet34_Weights.IMAGENET1K_V1`, 73.31 top-1 by torchvision's
own figure): pass its file as `teacher_weights=` (a .safetensors or a weights-only .pth of its
state dict; docs/pretrained.md), and the teacher is used as it is. Without it the teacher stage
trains one from labels with the same recipe.

Published figures (the references' runs, not ours): torchdistill's benchmark, ResNet-18 student of
a ResNet-34 teacher, 71.37 top-1 with KD and 71.95 with DIST, against the 69.76 of torchvision's
ResNet-18; mdistiller's README: KD 71.03, DKD 71.70. Expected result here: not measured (no
ImageNet and no accelerator on the development machines).

The data: an extracted ImageNet in the folder layout (`data_dir`/train/<wnid>/*.JPEG,
`data_dir`/val/<wnid>/*.JPEG; docs/data.md), streamed through Grain. Config-string arguments:
`data_dir=<ROOT>` (default ~/imagenet), `teacher_weights=<file>`, `method=<name>` (default kd),
`seed=<int>`, `smoke` (experiments/configs/common.py `imagenet_smoke`: the real models at 224 for
3 steps per stage on a tiny generated folder).
"""

from experiments.configs import common


def get_config(arg=None):
    c, a = common.imagenet_pair(arg, "resnet34_imagenet", "resnet18_imagenet")
    c.batch_size = 256
    c.teacher.epochs = c.student.epochs = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
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

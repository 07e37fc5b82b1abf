"""Your own image folder and a pretrained ImageNet teacher, in one config: fine-tune the teacher
on your classes (a new head; `freeze` keeps its backbone fixed), distil a student from it, and
train the same student from scratch beside it for comparison.

    python -m experiments.cifar --config=experiments/configs/folder_finetune.py:data_dir=/data/flowers,teacher_weights=resnet50.safetensors
    python -m experiments.cifar --config=experiments/configs/folder_finetune.py:data_dir=/data/flowers,teacher_weights=resnet50.safetensors,freeze,student=resnet18_imagenet
    python -m experiments.cifar --config=experiments/configs/folder_finetune.py:smoke

The folder: `data_dir`/train/<class>/<image> and `data_dir`/val/<class>/<image> (or test/), class
index = sorted folder names (docs/data.md); 10% of train is held out to select each stage's
checkpoint. The teacher: a torchvision / timm weights file (`teacher_weights=`; its architecture
and kdjax model are read from the file, docs/pretrained.md), trained for `teacher_epochs` with a
fresh head for your classes (`freeze`: only the head, BatchNorm statistics kept: a linear probe).
Every model's input is normalised as the weights expect (`dataset.normalize` resolves from them).
Then the student (`student=<kdjax model>`, default mobilenetv2_imagenet, from scratch) is distilled
with KD (T=4, CE and KD 0.5 each; `method=` for another) for `student_epochs`, and
`student_scratch` trains it from labels alone for the same epochs. The run's table and report
compare the three. Without `teacher_weights` the teacher (`teacher=`, default resnet50_imagenet)
is trained from labels like the student.

Recipe: SGD momentum 0.9, lr 0.01, cosine, weight decay 1e-4, batch 64, random-resized crop 224 +
flip; teacher 10 epochs, student 30. Not tuned (nothing was measured on a real folder here).

Config-string arguments: `data_dir=<ROOT>` (default ~/images), `teacher_weights=<file>`,
`teacher=<model>`, `student=<model>`, `freeze`, `teacher_epochs=<int>`, `student_epochs=<int>`,
`image_size=<int>` (default 224), `method=<name>` (default kd), `seed=<int>`, `smoke` (one epoch of
3 steps of 4 per stage on a tiny generated folder).
"""

import os
import tempfile

from experiments.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, method="kd", seed=0, data_dir="", teacher_weights="",
                         teacher="resnet50_imagenet", student="mobilenetv2_imagenet", freeze=False,
                         teacher_epochs=10, student_epochs=30, image_size=224)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "folder"
    c.dataset.data_dir = a.data_dir or "~/images"
    c.dataset.image_size = a.image_size
    c.dataset.val_size = 0.1
    c.augment.flip = True
    c.batch_size = 64
    c.eval_batch_size = 128
    c.teacher.model = a.teacher
    if a.teacher_weights:
        from kdjax.models import pretrained

        c.teacher.weights = a.teacher_weights
        c.teacher.model = pretrained.arch_of(a.teacher_weights).model  # the file says which model it fills
    if a.freeze:
        c.teacher.freeze = "^(?!(fc|head|head_dist|classifier)/)"  # all but the classifier
    c.student.model = a.student
    c.teacher.epochs, c.student.epochs = a.teacher_epochs, a.student_epochs
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    if a.method == "kd":
        c.distill.temperature = 4.0
        c.distill.ce_weight = 0.5
        c.distill.kd.weight = 0.5
    if a.smoke:
        common.smoke(c)
        c.dataset.mock_examples = 0
        c.dataset.data_dir = a.data_dir or common.smoke_folder(os.path.join(tempfile.gettempdir(), "kdjax-smoke-folder-4"))
        c.dataset.val_size = 0.0
        c.dataset.loader_workers = 1
        c.batch_size = c.eval_batch_size = c.throughput_batch = 4
    return c

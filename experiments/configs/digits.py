"""Offline default: sklearn's 8x8 digits, small CNN teacher -> 32-unit MLP student, KD (T=4).

    python -m experiments.digits
    python -m experiments.digits --config.distill.method=dkd
    python -m experiments.digits --config=experiments/configs/digits.py:method=at

Trains the teacher, distils the student, trains the same student from scratch, and prints the
comparison table. Methods that match feature maps (``Method.feature_maps``: fitnet, ofd, at, sp,
nst, vid, reviewkd, sdd, kdsvd, fsp, ab, ft) need a convolutional student, and deit
(``Method.vit_student``) a distilled ViT (`DIGITS_VIT`): choose the method with
the config-string argument (`:method=at`), which also switches the student (to `cnn_tiny`), or add
`--config.student.model=cnn_tiny`. kdsvd and fsp compare maps channel by channel
(``Method.same_widths``), so their cnn_tiny is as wide as the teacher (channels 32, 64;
RepDistiller's FSP refuses unequal widths too). The
two-stage methods fsp, ab and ft (`kdjax.distill.init_terms`) get a `student_init` stage of
INIT_EPOCHS epochs first (RepDistiller: 30 of 240).
Learning rates: tuned for Adam, 3e-3 for the teacher and 1e-2 for the MLP student
(`optimizer.tuned_learning_rates={'adam': 3e-3}` and `student.learning_rate_scale=10/3`). Another
optimizer (`--config.optimizer.name=adadelta`) gets its own default rate
(kdjax.optim.DEFAULT_LEARNING_RATES) times the same stage scales; the KD student reaches >= 0.95
with each of the six (tests/test_optim.py). `--config.optimizer.learning_rate=x` sets the base
rate (the teacher's; the student's is 10/3 of it).
Measured results: README.md (the offline default) and docs/methods.md (every method, 3 seeds).
Config-string arguments (``--config=experiments/configs/digits.py:method=at,seed=1``):
  method  distillation method name(s) (see kdjax.distill.METHODS)
  seed    random seed
"""

from experiments.configs import common
from kdjax import distill

# What the registry says about each method (kdjax.distill.Method): it reads feature maps (a
# convolutional student), and it compares maps channel by channel (the teacher's widths).
FEATURE_MAP_METHODS = frozenset(n for n, m in distill.METHODS.items() if m.feature_maps)
SAME_WIDTH_METHODS = frozenset(n for n, m in distill.METHODS.items() if m.same_widths)
# ... and it reads a distilled ViT's two heads (DeiT): a small distilled ViT on the 8x8 digits
# (patch 2: 16 tokens + 2; width 64, 2 blocks of 2 heads).
VIT_STUDENT_METHODS = frozenset(n for n, m in distill.METHODS.items() if m.vit_student)
DIGITS_VIT = {"patch_size": 2, "image_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
INIT_EPOCHS = 8  # the student_init stage of the two-stage methods: 60 / 8, RepDistiller's 240 / 30


def get_config(arg=None):
    a = common.parse_arg(arg, method="kd", seed=0)
    c = common.base(a.method)
    c.seed = a.seed
    c.dataset.name = "digits"
    c.batch_size = 64
    c.log_every_steps = 100
    c.augment.crop_padding = 0  # 8x8 digits: crops hurt the MLP student; no flips (not flip-invariant)
    c.teacher.model = "cnn_small"
    c.teacher.epochs = 20
    # Methods that match feature maps need a convolutional student; the others use the MLP.
    c.student.model = "cnn_tiny" if set(a.method.split("+")) & FEATURE_MAP_METHODS else "mlp"
    if set(a.method.split("+")) & SAME_WIDTH_METHODS:
        c.student.kwargs.channels = (32, 64)  # cnn_small's widths, cnn_tiny's depth
    if set(a.method.split("+")) & VIT_STUDENT_METHODS:
        c.student.model = "deit_tiny_distilled_patch4_32"
        for key, value in DIGITS_VIT.items():
            c.student.kwargs[key] = value
    if distill.init_terms(a.method):
        c.stages = "teacher,student_init,student,student_scratch"
        c.student_init.epochs = INIT_EPOCHS
        c.student_init.terms = ",".join(distill.init_terms(a.method))
    c.student.epochs = 60
    # The MLP student learns best at 10/3 of the teacher's rate (Adam: 1e-2 vs 3e-3). The base
    # rate 3e-3 is tuned for Adam only: it would not suit other optimizers (SGD at 10x its
    # default diverges), which get their own defaults instead.
    c.student.learning_rate_scale = 10 / 3
    c.optimizer.name = "adam"
    c.optimizer.tuned_learning_rates.adam = 3e-3  # learning_rate None: 3e-3 with adam, else the default
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.throughput_batch = 512
    return c

"""Defaults shared by every experiment config, and the config-string argument parser.

Each config file's `get_config(arg)` starts from `base()` and changes what its experiment needs.
Every field here can be overridden from the command line, e.g. ``--config.optimizer.name=adam``.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from kdjax import distill, models, optim


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style config-string argument: 'smoke,method=at' -> {smoke: True, method: 'at'}.

    Keys must be among `defaults`; values are converted to the default's type.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; choose from: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not sep:
            value = True
        elif isinstance(default, bool):
            value = value.strip().lower() in ("1", "true", "yes")
        elif default is not None:
            value = type(default)(value)
        out[key] = value
    return ml_collections.ConfigDict(out)


def base(method: str = "kd") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = "teacher,student,student_scratch"  # stages to run, in order (+ 'student_init', below)
    c.batch_size = 64  # global batch (split over all devices and processes)
    c.eval_batch_size = 500
    c.throughput_batch = 256  # batch for the inference images/s figure in summary.json
    c.parallel = "jit"  # 'jit' (jax.jit over a ('data',) mesh, shard_map body) or 'pmap'
    c.num_devices = config_dict.placeholder(int)  # None: all devices; n: the first n (one process)
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
    c.log_every_steps = 50
    c.nan_policy = "stop"  # a NaN/Inf loss or gradient: 'stop' the run (one line, exit 1) or 'skip' the step
    # JAX's persistent compilation cache: a second launch of the same run skips recompiling ('' = off)
    c.compile_cache_dir = "~/.cache/kdjax/jax"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "digits"
    c.dataset.data_dir = config_dict.placeholder(str)  # a prepared tfds data_dir
    c.dataset.manual_dir = config_dict.placeholder(str)  # a folder of the original archives
    c.dataset.val_size = 0.0  # fraction (or count) of train held out for checkpoint selection
    # k-fold cross-validation: folds >= 2 runs the whole experiment once per fold (fold k of a
    # stratified partition of train is the validation split; <workdir>/fold<k>/) and reports mean
    # +- std over folds in <workdir>/cv.json. `fold` is set per run by the trainer.
    c.dataset.folds = 0
    c.dataset.fold = 0
    c.dataset.download = True  # let tfds try to download when the data is not prepared
    c.dataset.mock_examples = 0  # > 0: use tfds.testing.mock_data with this many examples
    c.dataset.classes = ""  # e.g. '5,6,7,8,9': only these classes, relabelled 0..k-1 ('' = all)
    c.dataset.train_per_class = config_dict.placeholder(int)  # few-shot: this many training examples per class

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 0  # random crop after zero padding by this many pixels
    c.augment.flip = False  # random horizontal flip
    c.augment.mixup_alpha = 0.0
    c.augment.cutmix_alpha = 0.0
    # 'weak,strong': two augmented views per image (the weak one: crop/flip above; the strong one:
    # its own crop/flip + RandAugment + Cutout, kdjax.data.strong_augment) for methods that read
    # both, e.g. mlkd; features of the strong view reach the terms as 'strong/<name>'. '' = one view.
    # On by default for a method that needs it (`:method=mlkd`), off otherwise.
    needs = [distill.METHODS[m].views for m in method.split("+") if m.strip() in distill.METHODS]
    c.augment.views = "weak,strong" if any(needs) else ""

    for role in ("teacher", "student"):
        m = ml_collections.ConfigDict()
        m.model = ""
        m.kwargs = ml_collections.ConfigDict()  # extra constructor arguments of the model
        m.dropout = 0.0  # dropout rate, for the models that have it (mlp, cnn_small, cnn_tiny, wrn_*)
        m.epochs = 1
        # This stage's (peak) learning rate = optimizer.learning_rate x this scale, so a changed
        # optimizer or optimizer.learning_rate reaches every stage and keeps their ratio.
        m.learning_rate_scale = 1.0
        c[role] = m
    # Where the student's teacher comes from:
    #   'trained': the 'teacher' stage, or the model of an earlier run (teacher.checkpoint = that
    #              run's workdir; checkpoint_role='student' makes an earlier student the teacher,
    #              i.e. born-again self-distillation);
    #   'ema':     Mean Teacher: an exponential moving average of the student, updated every step.
    c.teacher.source = "trained"
    c.teacher.checkpoint = config_dict.placeholder(str)
    c.teacher.checkpoint_role = "teacher"
    c.teacher.ema_decay = 0.999
    # More teachers (comma-separated workdirs of earlier runs): the student learns from the
    # ensemble. Each logit term's target is the weighted average of the teachers' class
    # probabilities at that term's temperature (multi-teacher KD; kdjax.distill.ensemble_logits).
    c.teacher.ensemble = ""
    # One weight per teacher, comma-separated, in the order: the trained or checkpoint teacher (if
    # any), then teacher.ensemble's runs ('' = equal weights; normalised to sum 1).
    c.teacher.ensemble_weights = ""
    # Feature methods (at, fitnet, crd, ...) with several teachers read the features of the
    # teacher with this index (same order as ensemble_weights); unset, they are refused.
    c.teacher.feature_source = config_dict.placeholder(int)
    # Two-stage methods: stage 'student_init' (list it before 'student' in `stages`) first trains
    # the student with only these distillation terms (e.g. FitNet's hint: terms='fitnet').
    c.student_init = ml_collections.ConfigDict()
    c.student_init.epochs = 0
    c.student_init.terms = ""
    # Transfer learning: the listed stages start from the model of stage init.role of the earlier
    # run init.from_run, matched by variable path; paths matching the regex init.reinit (e.g.
    # 'head' for a new classification head) stay freshly initialised.
    # Stage 'prune' (list it after 'student', or start it from an earlier run's student with
    # init.from_run=<run>, init.role='student', init.stages='prune'): the distilled student pruned
    # and fine-tuned for prune.epochs at prune.learning_rate_scale times the student's rate, with
    # the student's distillation objective (recovery by distillation).
    # method 'magnitude' (sparsity, scope 'layer' or 'global') or 'nm' (n of every m along each
    # kernel's input dimension); gradual (Zhu & Gupta) from begin_epoch to end_epoch, masks updated
    # every update_every steps (end_epoch <= begin_epoch: one-shot). Pruned: the conv and dense
    # kernels matching `include` and not `exclude` (regexes over paths such as 'conv1_1/kernel'),
    # never the first convolution (the one reading the image) nor the classifier.
    # method 'channel': structured; removes the fraction `sparsity` of the output channels (units)
    # of every hidden layer matching include/exclude (layer names such as 'conv1_1', 'fc1'), ranked
    # by `criterion` ('l1': L1 norm of the filter; 'bn': |BatchNorm gamma|, network slimming), and
    # fine-tunes the genuinely smaller network (MLP and plain-CNN students; see kdjax.prune).
    c.prune = ml_collections.ConfigDict()
    c.prune.method = "magnitude"
    c.prune.sparsity = 0.7
    c.prune.scope = "layer"
    c.prune.n = 2
    c.prune.m = 4
    c.prune.epochs = 5
    c.prune.begin_epoch = 0.0
    c.prune.end_epoch = 0.0
    c.prune.update_every = 10
    c.prune.include = ""
    c.prune.exclude = ""
    c.prune.criterion = "l1"
    c.prune.learning_rate_scale = 1.0
    # int8 quantisation with Qwix (kdjax.quantize): per-channel symmetric int8 weights; mode
    # 'weights' (weights only) or 'static' (int8 activations too, scales calibrated on
    # calibration_batches training batches). Layers whose path matches the regex `exclude` stay
    # float. Stage 'qat' (placed like 'prune'): quantisation-aware training with a straight-through
    # estimator for quant.epochs, with the student's distillation objective; experiments.compress
    # and experiments.export convert its weights to int8 with the same mode.
    c.quant = ml_collections.ConfigDict()
    c.quant.mode = "static"
    c.quant.exclude = ""
    c.quant.calibration_batches = 4
    c.quant.epochs = 5
    c.quant.learning_rate_scale = 1.0
    c.init = ml_collections.ConfigDict()
    c.init.from_run = config_dict.placeholder(str)
    c.init.role = "teacher"
    c.init.stages = "teacher"
    c.init.reinit = ""

    # Early stopping: end a stage once the validation accuracy has not improved for this many
    # epochs (0: off; needs dataset.val_size > 0). The best-validation checkpoint is the one used.
    c.train = ml_collections.ConfigDict()
    c.train.early_stop_patience = 0
    # Where the numbers go (kdjax/logs.py): a progress bar on a terminal (else a line every
    # progress_seconds), TensorBoard event files in <workdir>/tensorboard/<stage>, and W&B when
    # wandb is installed. Per-step and per-evaluation lines: --verbosity=1; always metrics.jsonl.
    c.log = ml_collections.ConfigDict()
    c.log.progress = True
    c.log.progress_seconds = 30.0
    c.log.tensorboard = True
    c.log.wandb = False
    # The evaluation report (python -m experiments.evaluate) at the end of every run.
    c.log.report = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd, adam, adamw, rmsprop, adagrad, adadelta
    # The base learning rate; each stage multiplies it by its <stage>.learning_rate_scale.
    # None: this config's tuned rate for the chosen optimizer (tuned_learning_rates), else the
    # optimizer's own default (DEFAULT_LEARNING_RATES, below), so changing only optimizer.name
    # gives that optimizer a sensible rate.
    c.optimizer.learning_rate = config_dict.placeholder(float)
    # {optimizer name: base rate} that a config was tuned at (digits: {'adam': 3e-3}); applies
    # only while that optimizer is chosen and optimizer.learning_rate is None.
    c.optimizer.tuned_learning_rates = ml_collections.ConfigDict()
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd: Nesterov momentum; adam/adamw: NAdam
    c.optimizer.weight_decay = 5e-4  # coupled L2 (torch semantics); decoupled for adamw
    c.optimizer.decay_all = False  # False: decay kernels only; True: every parameter (biases, norms), like torch's model.parameters()
    c.optimizer.grad_clip_norm = config_dict.placeholder(float)
    c.optimizer.b1 = 0.9  # adam/adamw betas (torch defaults)
    c.optimizer.b2 = 0.999
    c.optimizer.eps = config_dict.placeholder(float)  # None: torch's (adam/adamw/rmsprop 1e-8, adagrad 1e-10, adadelta 1e-6)
    c.optimizer.rmsprop_decay = 0.9  # rmsprop: squared-gradient average decay (torch's alpha)
    c.optimizer.adadelta_rho = 0.9  # adadelta: decay of both running averages (torch's rho)
    # DOT (Zhao et al. ICCV 2023, kdjax.optim.dot): SGD with momentum - dot_delta on the task loss's
    # gradient and momentum + dot_delta on the distillation loss's (mdistiller SOLVER.DOT.DELTA).
    # optimizer.name=dot is refused for now: the train step passes one gradient, of the summed loss.
    c.optimizer.dot_delta = 0.075
    # Transfer learning: parameters frozen (regex over the model's parameter paths such as
    # 'conv1_0/kernel'; '^(?!head/)' freezes everything but the head: a linear probe), and the head's
    # own learning rate (head_learning_rate_scale x the stage's rate; discriminative fine-tuning).
    c.optimizer.freeze = ""
    c.optimizer.head = models.CLASSIFIER  # the classifier layer of every kdjax model
    c.optimizer.head_learning_rate_scale = 1.0
    c.optimizer.schedule = "constant"  # constant, cosine, step, multistep, linear
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.decay_epochs = (150, 180, 210)  # multistep boundaries
    c.optimizer.decay_factor = 0.1
    c.optimizer.step_epochs = 30.0  # 'step' schedule period

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0  # on the hard-label cross-entropy term
    c.loss.l1 = 0.0  # weight of sum|w| over the student's kernels
    c.loss.l2 = 0.0  # weight of 0.5*sum w^2 over the student's kernels (besides weight decay)

    c.distill = distill.get_config(method)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2  # latest checkpoints kept (the best one is always kept too)
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch only
    c.checkpoint.every_minutes = 0.0
    return c


# The base learning rate of each optimizer when optimizer.learning_rate is None and the config
# has no tuned rate for it (kdjax.optim holds the table, kdjax.optim.resolve_learning_rate applies
# it; tests/test_configs.py checks this copy):
#
#   optimizer  default lr  reference
#   sgd        0.05        RepDistiller / mdistiller CIFAR recipe (momentum 0.9, batch 64); SGD
#                          has no tuned default (torch's lr was required until torch 2.2's 1e-3)
#   adam       0.001       torch.optim.Adam; Kingma & Ba (2015)
#   adamw      0.001       torch.optim.AdamW; Loshchilov & Hutter (2019)
#   rmsprop    0.01        torch.optim.RMSprop
#   adagrad    0.01        torch.optim.Adagrad
#   adadelta   1.0         torch.optim.Adadelta; Zeiler (2012) (the update is already unit-scaled)
#   dot        0.05        SGD's: DOT is SGD with one momentum per loss (mdistiller's CIFAR recipe)
DEFAULT_LEARNING_RATES = optim.DEFAULT_LEARNING_RATES


def smoke(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config in place to a few steps per stage on `tfds.testing.mock_data`.

    Same models, same pipeline (tfds loading, augmentation, distillation, checkpoints, summary);
    only the data (random mock examples) and the run length change.
    """
    c.dataset.mock_examples = 64
    c.batch_size = 16
    c.eval_batch_size = 32
    c.throughput_batch = 16
    c.log_every_steps = 1
    for role in ("teacher", "student"):
        c[role].epochs = 1
    if c.student_init.epochs:
        c.student_init.epochs = 1
    c.optimizer.schedule = "constant"


def cifar_recipe(arg, dataset: str, teacher: str, student: str, *, student_lr_scale: float = 1.0,
                 dkd_beta: float = 8.0) -> ml_collections.ConfigDict:
    """The RepDistiller / mdistiller CIFAR recipe for one teacher -> student pair.

    240 epochs, batch 64, SGD momentum 0.9, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students:
    `student_lr_scale=0.2`), x0.1 at epochs 150/180/210, weight decay 5e-4, random crop (pad 4) +
    flip. The rate is SGD's default (optimizer.learning_rate=None), so
    `--config.optimizer.learning_rate=0.1` sets the teachers' rate and scales the students' with
    it, and `--config.optimizer.name=adam` gives Adam's own default. Each method keeps
    the weights of the reference code (kdjax.distill.METHODS); DKD's beta is per pair.
    Config-string arguments: `method=<name>` (default kd), `seed=<int>`, `smoke`, and
    `init_epochs=<n>`: first train the student for n epochs on the method's own terms alone (the
    `student_init` stage: FitNet's hint pre-training; RepDistiller uses 30 init epochs for AB/FSP).
    The two-stage methods fsp, ab and ft (`kdjax.distill.init_terms`) always get that stage, with
    RepDistiller's 30 init epochs unless `init_epochs` says otherwise.
    """
    a = parse_arg(arg, smoke=False, method="kd", seed=0, init_epochs=0)
    c = base(a.method)
    c.seed = a.seed
    c.dataset.name = dataset
    c.batch_size = 64
    c.augment.crop_padding = 4
    c.augment.flip = True
    c.teacher.model = teacher
    c.teacher.epochs = 240
    c.student.model = student
    c.student.epochs = 240
    c.student.learning_rate_scale = student_lr_scale
    c.optimizer.name = "sgd"  # learning rate: None = sgd's default, 0.05 (RepDistiller's)
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "multistep"
    c.optimizer.decay_epochs = (150, 180, 210)
    c.distill.temperature = 4.0
    c.distill.dkd.beta = dkd_beta
    init_epochs = a.init_epochs or (30 if distill.init_terms(a.method) else 0)  # RepDistiller --init_epochs 30
    if init_epochs:
        c.stages = "teacher,student_init,student,student_scratch"
        c.student_init.epochs = init_epochs
        c.student_init.terms = ",".join(n for n in a.method.split("+") if n != "kd")
    if a.smoke:
        smoke(c)
    return c

"""The experiment config: its schema (`base`, one comment a field) and loading a config file.

Every experiment config (experiments/configs/*.py) is a short overlay of `base(method)`: its
`get_config(arg=None)` starts from it and changes what the experiment needs, and any field can be
overridden on the command line (``--config.optimizer.name=adam``). A run's identity, and so the
default run folder, covers the fields where a config differs from `base` (experiments/launch.py).

The checks of a config's values live here too (`validate`, and `planned_stages` for the stage
list): one-line errors before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import ml_collections
from ml_collections import config_dict

from kdjax import optim

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


def base(method: str = "kd") -> ml_collections.ConfigDict:
    """Every field of an experiment config, with its default; `method` is config.distill.method
    (it also decides augment.views' default)."""
    from kdjax import (  # here, not above: any kdjax module may import kdjax.config
        distill,
        models,
    )

    c = ml_collections.ConfigDict()
    c.seed = 0  # the run's random seed (initialisation, batch order, augmentation)
    c.stages = "teacher,student,student_scratch"  # stages to run, in order (+ 'student_init', below)
    c.batch_size = 64  # global batch (split over all devices and processes)
    c.eval_batch_size = 500  # batch of the evaluation passes (validation, test)
    c.throughput_batch = 256  # batch for the inference images/s figure in summary.json
    c.parallel = "jit"  # 'jit' (jax.jit over a ('data',) mesh, shard_map body) or 'pmap'
    c.num_devices = config_dict.placeholder(int)  # None: all devices; n: the first n (one process)
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
    c.log_every_steps = 50  # training metrics are logged every this many steps (and at the last)
    c.nan_policy = "stop"  # a NaN/Inf loss or gradient: 'stop' the run (one line, exit 1) or 'skip' the step
    # JAX's persistent compilation cache: a second launch of the same run skips recompiling ('' = off)
    c.compile_cache_dir = "~/.cache/kdjax/jax"

    c.dataset = ml_collections.ConfigDict()
    # a kdjax.data.DATASETS name: in memory: digits (offline), mnist, fashion_mnist, cifar10, cifar100;
    # streamed through Grain (docs/data.md): 'folder' (an image folder: data_dir/train/<class>/<image>
    # and data_dir/val/<class>/<image> or data_dir/test/...), 'imagenet2012' (the same layout, 1000 classes)
    # and 'tfds:<name>' (any tfds image-classification data set prepared as ArrayRecord in data_dir,
    # e.g. 'tfds:cifar10', 'tfds:imagenet2012'; read without TensorFlow)
    c.dataset.name = "digits"
    # a prepared tfds data_dir (for 'tfds:<name>': where it was prepared as ArrayRecord); for 'folder'/'imagenet2012': the ROOT
    c.dataset.data_dir = config_dict.placeholder(str)
    c.dataset.manual_dir = config_dict.placeholder(str)  # a folder of the original archives
    c.dataset.val_size = 0.0  # fraction (or count) of train held out for checkpoint selection
    # k-fold cross-validation: folds >= 2 runs the whole experiment once per fold (fold k of a
    # stratified partition of train is the validation split; <workdir>/fold<k>/) and reports mean
    # +- std over folds in <workdir>/cv.json. `fold` is set per run by the trainer.
    c.dataset.folds = 0
    c.dataset.fold = 0
    c.dataset.download = True  # let tfds try to download when the data is not prepared (never for tfds:<name>)
    c.dataset.mock_examples = 0  # > 0: use tfds.testing.mock_data with this many examples
    c.dataset.classes = ""  # e.g. '5,6,7,8,9': only these classes, relabelled 0..k-1 ('' = all)
    c.dataset.train_per_class = config_dict.placeholder(int)  # few-shot: this many training examples per class
    # Streamed data sets only (unset for the in-memory ones). image_size: the side of the square
    # images the loader makes (train: random-resized crop + augment.flip on the workers; eval:
    # shorter side to image_size / 0.875, center crop), None: 224. loader_workers: Grain worker
    # processes decoding the training batches (None: the machine's cores - 1, at least 1; 0: in the
    # training process; at most the cores); evaluation decodes on max(1, loader_workers) threads.
    # The batches do not depend on loader_workers, only the speed does.
    c.dataset.image_size = config_dict.placeholder(int)
    c.dataset.loader_workers = config_dict.placeholder(int)
    # The per-channel mean and std every model's input is normalised with: 'data' (the data set's own
    # statistics; ImageNet's for image folders), 'imagenet' or 'inception' (kdjax.data.NORMALIZATIONS);
    # '' = what config.teacher.weights / config.student.weights expect when a role starts from
    # published weights (their kdjax.models.pretrained preprocessing), else 'data'. A run records the
    # resolved name in its config.json (resolve_normalization).
    c.dataset.normalize = ""

    c.augment = ml_collections.ConfigDict()
    c.augment.crop_padding = 0  # random crop after zero padding by this many pixels (in-memory data sets)
    c.augment.flip = False  # random horizontal flip (streamed data sets: on the loader workers)
    c.augment.mixup_alpha = 0.0  # > 0: batch-level mixup, lam ~ Beta(alpha, alpha) (kdjax.data.mixup)
    c.augment.cutmix_alpha = 0.0  # > 0: batch-level CutMix (kdjax.data.cutmix); not with mixup
    # 'weak,strong': two augmented views per image (the weak one: crop/flip above; the strong one:
    # its own crop/flip + RandAugment + Cutout, kdjax.data.strong_augment) for methods that read
    # both, e.g. mlkd; features of the strong view reach the terms as 'strong/<name>'. '' = one view.
    # On by default for a method that needs it (`:method=mlkd`), off otherwise.
    needs = [distill.METHODS[m].views for m in method.split("+") if m.strip() in distill.METHODS]
    c.augment.views = "weak,strong" if any(needs) else ""

    for role in ("teacher", "student"):
        m = ml_collections.ConfigDict()
        m.model = ""  # a kdjax.models.MODELS name, e.g. cnn_small, resnet18, mobilenetv2
        m.kwargs = ml_collections.ConfigDict()  # extra constructor arguments of the model
        m.dropout = 0.0  # dropout rate, for the models that have it (mlp, cnn_small, cnn_tiny, wrn_*, mobilenetv2*, the ViTs)
        m.epochs = 1  # this stage's training epochs (student: also student_scratch's)
        # This stage's (peak) learning rate = optimizer.learning_rate x this scale, so a changed
        # optimizer or optimizer.learning_rate reaches every stage and keeps their ratio.
        m.learning_rate_scale = 1.0
        # A torchvision / timm weights file (.safetensors, .pth, .pt; kdjax.models.pretrained,
        # docs/pretrained.md) the role starts from: `model` must be the kdjax model its architecture
        # loads into (e.g. resnet50_imagenet). The teacher with epochs=0 is used as it is (no teacher
        # stage); otherwise the stage (student: also student_scratch) trains from it, with a new head
        # where the data set's class count differs from the weights'.
        m.weights = config_dict.placeholder(str)
        # A regex of this role's parameter paths kept frozen while its stage trains, with
        # optimizer.freeze (which every stage applies): e.g. teacher.freeze='^(?!fc/)' fine-tunes only
        # the new head of imported teacher weights (a frozen backbone, its BatchNorm statistics too).
        m.freeze = ""
        m.weights_arch = ""  # the weights' kdjax.models.pretrained.ARCHS name ('' = inferred from the keys)
        c[role] = m
    # Where the student's teacher comes from:
    #   'trained': the 'teacher' stage, or the model of an earlier run (teacher.checkpoint = that
    #              run's workdir; checkpoint_role='student' makes an earlier student the teacher,
    #              i.e. born-again self-distillation);
    #   'ema':     Mean Teacher: an exponential moving average of the student, updated every step.
    c.teacher.source = "trained"
    c.teacher.checkpoint = config_dict.placeholder(str)  # an earlier run's workdir: its model is the teacher
    c.teacher.checkpoint_role = "teacher"  # which model of that run: 'teacher' or 'student'
    c.teacher.ema_decay = 0.999  # source 'ema': the moving average's decay per step
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
    c.student_init.epochs = 0  # the stage's epochs (> 0 when it is listed in `stages`)
    c.student_init.terms = ""  # comma-separated distillation terms it trains with, e.g. 'fitnet'
    # Stage 'prune' (list it after 'student', or start it from an earlier run's student with
    # init.from_run=<run>, init.role='student', init.stages='prune'): the distilled student pruned
    # and fine-tuned for prune.epochs at prune.learning_rate_scale times the student's rate, with
    # the student's distillation objective (recovery by distillation). See kdjax.prune.
    c.prune = ml_collections.ConfigDict()
    # 'magnitude' (sparsity, scope) or 'nm' (n of every m along each kernel's input dimension):
    # masks on the conv and dense kernels matching `include` and not `exclude` (regexes over paths
    # such as 'conv1_1/kernel'), never the first convolution (the one reading the image) nor the
    # classifier. 'channel': structured; removes the fraction `sparsity` of the output channels
    # (units) of every hidden layer matching include/exclude (layer names such as 'conv1_1', 'fc1'),
    # ranked by `criterion`, and fine-tunes the genuinely smaller network (MLP and plain-CNN
    # students; see kdjax.prune).
    c.prune.method = "magnitude"
    c.prune.sparsity = 0.7  # the fraction pruned: of the weights (magnitude) or of the channels (channel)
    c.prune.scope = "layer"  # magnitude: that fraction of each 'layer', or of all pruned kernels ('global')
    c.prune.n = 2  # nm: the n largest weights kept ...
    c.prune.m = 4  # ... in every group of m
    c.prune.epochs = 5  # the stage's fine-tuning epochs
    # Gradual pruning (Zhu & Gupta) from begin_epoch to end_epoch, masks updated every update_every
    # steps (end_epoch <= begin_epoch: one-shot).
    c.prune.begin_epoch = 0.0
    c.prune.end_epoch = 0.0
    c.prune.update_every = 10
    c.prune.include = ""  # regex of what is pruned ('' = everything prunable)
    c.prune.exclude = ""  # regex of what is not ('' = nothing)
    c.prune.criterion = "l1"  # channel: rank by 'l1' (the filter's L1 norm) or 'bn' (|BatchNorm gamma|, network slimming)
    c.prune.learning_rate_scale = 1.0  # the stage's rate: this x the student's
    # int8 quantisation with Qwix (kdjax.quantize): per-channel symmetric int8 weights. Stage 'qat'
    # (placed like 'prune'): quantisation-aware training with a straight-through estimator for
    # quant.epochs, with the student's distillation objective; experiments.compress and
    # experiments.export convert its weights to int8 with the same mode.
    c.quant = ml_collections.ConfigDict()
    c.quant.mode = "static"  # 'weights' (weights only) or 'static' (int8 activations too, calibrated)
    c.quant.exclude = ""  # layers whose path matches this regex stay float
    c.quant.calibration_batches = 4  # static: training batches that calibrate the activation scales
    c.quant.epochs = 5  # stage 'qat': its epochs
    c.quant.learning_rate_scale = 1.0  # stage 'qat': its rate is this x the student's
    # Transfer learning: the listed stages start from the model of stage init.role of the earlier
    # run init.from_run, matched by variable path; paths matching the regex init.reinit (e.g.
    # 'head' for a new classification head) stay freshly initialised.
    c.init = ml_collections.ConfigDict()
    c.init.from_run = config_dict.placeholder(str)  # the earlier run's workdir (None: no transfer)
    c.init.role = "teacher"  # which of its models
    c.init.stages = "teacher"  # comma-separated stages of this run that start from it
    c.init.reinit = ""  # regex of variable paths left freshly initialised

    c.train = ml_collections.ConfigDict()
    # Early stopping: end a stage once the validation accuracy has not improved for this many
    # epochs (0: off; needs dataset.val_size > 0). The best-validation checkpoint is the one used.
    c.train.early_stop_patience = 0
    # Where the numbers go (kdjax/logs.py). Per-step and per-evaluation lines: --verbosity=1;
    # always metrics.jsonl.
    c.log = ml_collections.ConfigDict()
    c.log.progress = True  # a progress bar on a terminal (else a line every progress_seconds)
    c.log.progress_seconds = 30.0  # off a terminal: a progress line every this many seconds
    c.log.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard/<stage>
    c.log.wandb = False  # Weights & Biases, when wandb is installed
    # The evaluation report (python -m experiments.evaluate) at the end of every run.
    c.log.report = True

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd, adam, adamw, rmsprop, adagrad, adadelta
    # The base learning rate; each stage multiplies it by its <stage>.learning_rate_scale.
    # None: this config's tuned rate for the chosen optimizer (tuned_learning_rates), else the
    # optimizer's own default (DEFAULT_LEARNING_RATES, above), so changing only optimizer.name
    # gives that optimizer a sensible rate.
    c.optimizer.learning_rate = config_dict.placeholder(float)
    # {optimizer name: base rate} that a config was tuned at (digits: {'adam': 3e-3}); applies
    # only while that optimizer is chosen and optimizer.learning_rate is None.
    c.optimizer.tuned_learning_rates = ml_collections.ConfigDict()
    c.optimizer.momentum = 0.9  # sgd only
    c.optimizer.nesterov = False  # sgd: Nesterov momentum; adam/adamw: NAdam
    c.optimizer.weight_decay = 5e-4  # coupled L2 (torch semantics); decoupled for adamw
    c.optimizer.decay_all = False  # False: decay kernels only; True: every parameter (biases, norms), like torch's model.parameters()
    c.optimizer.grad_clip_norm = config_dict.placeholder(float)  # clip gradients by this global norm (None: off)
    c.optimizer.b1 = 0.9  # adam/adamw: first-moment decay (torch's default beta1)
    c.optimizer.b2 = 0.999  # adam/adamw: second-moment decay (torch's default beta2)
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
    c.optimizer.head_learning_rate_scale = 1.0  # the head's rate: this x the stage's
    c.optimizer.schedule = "constant"  # constant, cosine, step, multistep, linear
    c.optimizer.warmup_epochs = 0.0  # linear warm-up from 0 to the stage's rate over this many epochs
    c.optimizer.decay_epochs = (150, 180, 210)  # multistep boundaries
    c.optimizer.decay_factor = 0.1  # step, multistep: the rate's factor at each boundary
    c.optimizer.step_epochs = 30.0  # 'step' schedule period

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.0  # on the hard-label cross-entropy term
    c.loss.l1 = 0.0  # weight of sum|w| over the student's kernels
    c.loss.l2 = 0.0  # weight of 0.5*sum w^2 over the student's kernels (besides weight decay)

    # The distillation method(s) ('kd+at' sums both methods' terms), the temperature, and every
    # method's weights (kdjax.distill.get_config; the methods and their papers: kdjax.distill.METHODS).
    c.distill = distill.get_config(method)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2  # latest checkpoints kept (the best one is always kept too)
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch only
    c.checkpoint.every_minutes = 0.0  # > 0: also save every this many minutes
    return c


def load_config_file(ref: str, what: str = "config file", root: str | None = None) -> ml_collections.ConfigDict:
    """`get_config([arg])` of the config file 'path[:arg]' (the arg is passed only when ':' is given).

    A relative path that does not exist from the current folder is looked up under `root` when
    given. Every failure is a one-line ValueError naming the file, `what` first: the file is
    missing, raises on import, defines no get_config, or get_config raises (its error's last line).
    The one loader of the entry points (experiments/launch.py) and of sweeps (kdjax.sweep)."""
    path, sep, arg = ref.partition(":")
    resolved = path
    if root is not None and not os.path.isabs(path) and not os.path.exists(path):
        candidate = os.path.join(root, path)
        resolved = candidate if os.path.exists(candidate) else path
    if not os.path.isfile(resolved):
        raise ValueError(f"{what} {path} not found")
    try:
        spec = importlib.util.spec_from_file_location("_kdjax_config_file", resolved)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - anything the user's config file raises
        raise _one_line(what, path, e) from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{what} {path} defines no get_config(arg=None) function")
    try:
        return module.get_config(*([arg] if sep else []))
    except Exception as e:  # noqa: BLE001
        raise _one_line(what, path, e) from None


def _one_line(what: str, path: str, error: BaseException) -> ValueError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return ValueError(f"{what} {path}: {type(error).__name__}" + (f": {lines[-1]}" if lines else ""))


# ----------------------------------------------------------------------------------------------
# Validation: one-line errors for a config that cannot run, before anything is loaded or written.

DTYPES = ("float32", "bfloat16")  # config.dtype


def imported_teacher(config) -> bool:
    """The teacher is config.teacher.weights used as they are (teacher.epochs=0): no teacher stage runs."""
    return bool(config.teacher.get("weights")) and config.teacher.epochs == 0


def resolve_normalization(config) -> str:
    """What config.dataset.normalize means for this run: the name given, else the statistics the
    roles' published weights expect (their `Preprocess.normalize`), else 'data'. Weights that expect
    different statistics get a one-line ValueError: every model of a run sees the same input."""
    from kdjax import data as kdata
    from kdjax import runs

    given = config.dataset.get("normalize", "")
    if given:
        if given != "data" and given not in kdata.NORMALIZATIONS:
            raise ValueError(f"unknown config.dataset.normalize {given!r}; choose one of: data, "
                             f"{', '.join(kdata.NORMALIZATIONS)} ('' = the weights' own, else data)")
        return given
    wanted = {}  # config field -> (normalisation, what it is)
    for role in ("teacher", "student"):
        if config[role].get("weights"):
            from kdjax.models import pretrained

            arch = pretrained.arch_of(config[role].weights, config[role].get("weights_arch") or None)
            wanted[f"{role}.weights"] = (arch.preprocess.normalize, arch.name)
    # a teacher trained by an earlier run keeps the normalisation it was trained with
    for run_dir in [config.teacher.get("checkpoint") or ""] + str(config.teacher.get("ensemble", "")).split(","):
        saved = runs.read_json(os.path.join(run_dir.strip(), "config.json")) if run_dir.strip() else None
        if saved is not None and "normalize" in saved.get("dataset", {}):
            wanted[f"teacher run {run_dir.strip()}"] = (saved["dataset"]["normalize"] or "data", "its config.json")
    if len({name for name, _ in wanted.values()}) > 1:
        raise ValueError("the teachers and weights expect different input statistics (" + ", ".join(
            f"{where}: {what} '{name}'" for where, (name, what) in wanted.items())
            + "), and every model of a run sees the same input: set config.dataset.normalize to one of them")
    return next(iter(wanted.values()))[0] if wanted else "data"


def check_weights(config, role: str) -> None:
    """One-line errors for config.<role>.weights: a file kdjax.models.pretrained cannot read or
    place, a model that is not the one its architecture loads into, or a second source for the
    same role's initial weights."""
    from kdjax.models import pretrained

    c = config[role]
    arch = pretrained.arch_of(c.weights, c.get("weights_arch") or None)
    if c.model != arch.model:
        raise ValueError(f"config.{role}.weights={c.weights} holds {arch.name} weights, which load into kdjax's "
                         f"{arch.model!r}; set config.{role}.model={arch.model} (it is {c.model!r})")
    if role == "teacher" and config.teacher.checkpoint:
        raise ValueError("config.teacher.weights and config.teacher.checkpoint both give the teacher; set one")
    init = config.get("init")
    stages_from_run = [r.strip() for r in str(init.stages).split(",")] if init is not None and init.from_run else []
    clash = [s for s in stages_from_run if s in ((role,) if role == "teacher" else ("student", "student_scratch"))]
    if clash:
        raise ValueError(f"config.{role}.weights and config.init.from_run (init.stages={init.stages}) both initialise "
                         f"stage {clash[0]!r}; set one")


def planned_stages(config) -> list[str]:
    """The stages `config.stages` lists, in order, checked against each other (one-line ValueErrors)."""
    from kdjax.stages import FINE_TUNES, ROLES
    listed = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    for s in listed:
        if s not in ROLES:
            raise ValueError(f"unknown stage {s!r} in config.stages; choose from: {', '.join(ROLES)}")
    source = config.teacher.source
    if source not in ("trained", "ema"):
        raise ValueError(f"unknown config.teacher.source {source!r}; choose one of: trained, ema")
    if source == "ema" and "teacher" in listed:
        raise ValueError("config.teacher.source='ema' (Mean Teacher) trains no teacher: remove 'teacher' from config.stages")
    has_teacher = ("teacher" in listed or config.teacher.checkpoint or config.teacher.ensemble or source == "ema"
                   or imported_teacher(config))
    if "student" in listed and not has_teacher:
        raise ValueError("stage 'student' needs a teacher: add 'teacher' to config.stages, or set "
                         "config.teacher.checkpoint, config.teacher.weights (with teacher.epochs=0), "
                         "config.teacher.ensemble or config.teacher.source='ema'")
    init = config.get("init")
    from_run = [r.strip() for r in str(init.stages).split(",")] if init is not None and init.from_run else []
    for role in FINE_TUNES:
        if role in listed and role not in from_run and (
                "student" not in listed or listed.index(role) < listed.index("student")):
            raise ValueError(f"stage {role!r} fine-tunes the distilled student: list it after 'student', or start it "
                             f"from an earlier run's student (init.from_run=<run>, init.role=student, "
                             f"init.stages={role})")
    if "student_init" in listed:
        if "student" not in listed or listed.index("student_init") > listed.index("student"):
            raise ValueError("stage 'student_init' initialises the student: list it before 'student'")
        if config.student_init.epochs <= 0:
            raise ValueError("stage 'student_init' needs config.student_init.epochs > 0")
    return listed


def validate(config) -> None:
    """One-line errors for settings that cannot work, before anything is loaded or written."""
    import jax

    from kdjax import data as kdata
    from kdjax import distill, logs, models, prune, quantize
    from kdjax import step as kstep

    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size must be a positive integer, got {config.batch_size}")
    n = config.num_devices or jax.device_count()
    if config.batch_size % n:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n} devices")
    if config.parallel not in kstep.DataParallel.MODES:
        raise ValueError(f"unknown config.parallel {config.parallel!r}; choose one of: jit, pmap")
    if config.nan_policy not in ("stop", "skip"):
        raise ValueError(f"unknown config.nan_policy {config.nan_policy!r}; choose one of: stop, skip")
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown config.dtype {config.dtype!r}; choose one of: {', '.join(DTYPES)}")
    for role in ("teacher", "student"):
        models.get_model(config[role].model, num_classes=2)  # raises on an unknown name
        rate = config[role].get("dropout", 0.0)
        if rate and not 0.0 < rate < 1.0:
            raise ValueError(f"config.{role}.dropout must be in [0, 1), got {rate}")
        if rate and "dropout" not in {f.name for f in dataclasses.fields(models.get_model(config[role].model, 2))}:
            raise ValueError(f"config.{role}.dropout={rate}: model {config[role].model!r} has no dropout; models with "
                             f"dropout: mlp, cnn_small, cnn_tiny, wrn_*, mobilenetv2*, vit_* / deit_*")
        if config[role].epochs <= 0 and not (role == "teacher" and imported_teacher(config)):
            raise ValueError(f"config.{role}.epochs must be > 0, got {config[role].epochs}"
                             + (" (0 only with config.teacher.weights: the imported teacher used as it is)"
                                if role == "teacher" else ""))
        if config[role].get("weights"):
            check_weights(config, role)
    parse_classes(config.dataset.get("classes", ""))
    resolve_normalization(config)
    p = config.get("prune")
    if p is not None:  # its values even where no stage reads them: experiments.compress's variants start from them
        prune.check({}, {}, p.method, p.sparsity, p.scope, p.n, p.m, p.criterion)  # kernels: in the pre-flight
    if p is not None and "prune" in planned_stages(config):
        if p.epochs <= 0:
            raise ValueError(f"config.prune.epochs must be > 0, got {p.epochs}")
        if p.method == "magnitude" and max(p.begin_epoch, p.end_epoch) > p.epochs:
            raise ValueError(f"config.prune.begin_epoch={p.begin_epoch} / end_epoch={p.end_epoch} lie beyond the "
                             f"stage's prune.epochs={p.epochs}: the target sparsity would never be reached")
    q = config.get("quant")
    if q is not None:
        quantize.check_settings(q.mode, q.exclude)
        if "qat" in planned_stages(config) and q.epochs <= 0:
            raise ValueError(f"config.quant.epochs must be > 0, got {q.epochs}")
        if q.calibration_batches < 0:
            raise ValueError(f"config.quant.calibration_batches must be >= 0, got {q.calibration_batches}")
    for field, regex in (("optimizer.freeze", config.optimizer.get("freeze", "")),
                         ("teacher.freeze", config.teacher.get("freeze", "")),
                         ("student.freeze", config.student.get("freeze", "")),
                         ("optimizer.head", config.optimizer.get("head", "")),
                         ("init.reinit", config.get("init", {}).get("reinit", ""))):
        try:
            re.compile(regex or "")
        except re.error as e:
            raise ValueError(f"config.{field}={regex!r} is not a valid regular expression ({e})") from None
    if float(config.optimizer.get("head_learning_rate_scale", 1.0)) < 0:
        raise ValueError("config.optimizer.head_learning_rate_scale must be >= 0")
    if not kdata.is_known(config.dataset.name):
        raise ValueError(f"unknown data set {config.dataset.name!r}; choose one of: {', '.join(kdata.DATASETS)}")
    _validate_streamed(config)
    opt = config.optimizer
    optim.make_optimizer(  # raises on an unknown optimizer or a bad hyper-parameter
        opt.name, 0.1, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay,
        grad_clip_norm=opt.grad_clip_norm, decay_all=opt.decay_all, b1=opt.b1, b2=opt.b2, eps=opt.eps,
        rmsprop_decay=opt.rmsprop_decay, adadelta_rho=opt.adadelta_rho, dot_delta=opt.get("dot_delta", 0.075))
    for role in ("student",) if imported_teacher(config) else ("teacher", "student"):
        lr = optim.resolve_learning_rate(opt.name, opt.learning_rate, config[role].learning_rate_scale,
                                         opt.tuned_learning_rates)
        optim.make_schedule(opt.schedule, base_lr=lr, total_steps=config[role].epochs, steps_per_epoch=1,
                            warmup_epochs=opt.warmup_epochs, decay_epochs=tuple(opt.decay_epochs),
                            decay_factor=opt.decay_factor, step_epochs=opt.step_epochs)
    aug = config.augment
    if aug.mixup_alpha > 0 and aug.cutmix_alpha > 0:
        raise ValueError(f"config.augment.mixup_alpha={aug.mixup_alpha} and cutmix_alpha={aug.cutmix_alpha} are both "
                         "> 0, but each batch gets mixup or cutmix, not both (cutmix would be ignored): set one to 0")
    if config.teacher.source == "ema":
        for field in ("checkpoint", "ensemble", "weights"):
            if config.teacher[field]:
                raise ValueError(f"config.teacher.source='ema' (Mean Teacher) makes the student's moving average the "
                                 f"teacher, so config.teacher.{field} would be ignored: unset one of the two")
    cache = config.distill.cache_teacher
    if cache not in kdata.CACHE_MODES:
        raise ValueError(f"unknown config.distill.cache_teacher {cache!r}; choose one of: {', '.join(kdata.CACHE_MODES)}")
    if cache == "on" and (obstacle := cache_obstacle(config)):
        raise ValueError(f"config.distill.cache_teacher='on' is invalid here: {obstacle}; use 'auto' or 'off'")
    _validate_store(config)
    patience = config.get("train", {}).get("early_stop_patience", 0)
    if patience and (patience < 0 or not (config.dataset.val_size or config.dataset.get("folds"))):
        raise ValueError(f"config.train.early_stop_patience={patience} needs a validation split to watch "
                         "(config.dataset.val_size > 0) and a positive number of epochs")
    logs.check_wandb(bool(config.get("log", {}).get("wandb", False)))
    for name in ("eval_batch_size", "throughput_batch", "log_every_steps"):
        if config[name] <= 0:
            raise ValueError(f"config.{name} must be a positive integer, got {config[name]}")
    # The views serve the distillation terms: checked against them when a stage distils ('student'),
    # only their spelling otherwise (a compare baseline of an mlkd config trains on the weak view).
    distill.check_views(distill.build_terms(config.distill.to_dict()), config.augment.get("views", ""))
    planned_stages(config)


def _validate_streamed(config) -> None:
    """The dataset fields of the streamed data sets (kdjax.data.stream) against the in-memory ones."""
    from kdjax import data as kdata
    from kdjax.data import stream

    d = config.dataset
    size, workers = d.get("image_size"), d.get("loader_workers")
    if not kdata.is_streamed(d.name):
        for field, value in (("image_size", size), ("loader_workers", workers)):
            if value is not None:
                raise ValueError(f"config.dataset.{field}={value} is for the streamed data sets "
                                 f"({', '.join(kdata.STREAMED_DATASETS)}); {d.name!r} is held in memory: unset it")
        return
    if importlib.util.find_spec("grain") is None or importlib.util.find_spec("PIL") is None:
        raise ValueError(f"config.dataset.name={d.name!r} is streamed through Grain, which is not installed: "
                         "pip install 'kdjax[stream]'")
    tfds_name = d.name.startswith(kdata.TFDS_PREFIX)
    if tfds_name and (importlib.util.find_spec("tensorflow_datasets") is None
                      or importlib.util.find_spec("array_record") is None):
        raise ValueError(f"config.dataset.name={d.name!r} is read with tensorflow-datasets' ArrayRecord reader, which "
                         "is not installed: pip install 'kdjax[arrayrecord]'")
    if tfds_name and not d.name[len(kdata.TFDS_PREFIX):].strip():
        raise ValueError(f"config.dataset.name={d.name!r} names no tfds data set: give tfds:<name>, e.g. tfds:cifar10")
    if not d.data_dir and tfds_name:
        raise ValueError(f"config.dataset.name={d.name!r} reads a tfds data set prepared as ArrayRecord: set "
                         "config.dataset.data_dir to the tfds data_dir it was prepared in (e.g. ~/tensorflow_datasets)")
    if not d.data_dir:
        raise ValueError(f"config.dataset.name={d.name!r} reads an image folder: set config.dataset.data_dir to its "
                         "ROOT (ROOT/train/<class>/<image>, ROOT/val/<class>/<image>)")
    if d.get("mock_examples", 0):
        raise ValueError(f"config.dataset.mock_examples={d.mock_examples} mocks the in-memory tfds data sets; "
                         f"{d.name!r} is streamed: unset it")
    if size is not None and not 8 <= size <= 4096:
        raise ValueError(f"config.dataset.image_size={size}: choose a side in 8..4096 pixels (None: 224)")
    if workers is not None:
        stream.check_workers(workers)
    if config.augment.crop_padding:
        raise ValueError(f"config.augment.crop_padding={config.augment.crop_padding}: a streamed data set is cropped on "
                         "the loader (random-resized crop); set augment.crop_padding=0")


def _validate_store(config) -> None:
    """distill.cache_top_k / cache_dir, and what the streamed data's soft-label store (kdjax.data.store) cannot serve."""
    from kdjax import data as kdata
    from kdjax import distill

    d = config.distill
    top_k, shared, streamed = d.get("cache_top_k"), d.get("cache_dir", ""), kdata.is_streamed(config.dataset.name)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"config.distill.cache_top_k={top_k!r}: choose a number of classes >= 1 (unset: all)")
    for field, value in (("cache_top_k", top_k), ("cache_dir", shared or None)):
        if value is not None and not streamed:
            raise ValueError(f"config.distill.{field}={value!r} is for the streamed data sets' soft-label store; "
                             f"{config.dataset.name!r} is held in memory and caches every logit: unset it")
        if value is not None and d.cache_teacher != "on":
            raise ValueError(f"config.distill.{field}={value!r} sets up the soft-label store, which only "
                             f"config.distill.cache_teacher='on' builds (it is {d.cache_teacher!r}): set 'on' or unset it")
    if shared:
        from kdjax import paths

        paths.check_remote(shared)
    if streamed and d.cache_teacher == "on":
        terms = distill.build_terms(d.to_dict())
        reads = sorted({n for t in terms for n in t.teacher} - {"logits"})
        if reads:
            raise ValueError(f"config.distill.cache_teacher='on' is invalid here: the method reads the teacher's "
                             f"{', '.join(reads)}, and a streamed data set's soft-label store keeps the logits only; "
                             "use 'auto' or 'off'")


def cache_obstacle(config) -> str | None:
    """Why config's teacher sees a different input for an example each epoch (see kdata.cache_obstacle).
    A streamed data set's random-resized crops and flips are no obstacle: they are replayed
    (kdjax.data.store keeps the teacher's logits for every epoch's crops)."""
    from kdjax import data as kdata

    a = config.augment
    streamed = kdata.is_streamed(config.dataset.name)
    return kdata.cache_obstacle(crop_padding=0 if streamed else a.crop_padding, flip=a.flip and not streamed,
                                mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
                                teacher_source=config.teacher.source, views=a.get("views", ""))


def parse_classes(value) -> tuple[int, ...] | None:
    """``dataset.classes``: '' (all) or comma-separated class ids such as '5,6,7,8,9'."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise ValueError(f"config.dataset.classes={value!r}: give comma-separated class ids, e.g. '5,6,7,8,9'") from None

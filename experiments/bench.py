"""Throughput of kdjax's real train and eval steps, optionally interleaved with PyTorch.

    python -m experiments.bench --suite [--out bench.json] [--steps 20] [--cases a,b]
                                [--compare-torch] [--torch-python PATH] [--torch-compile]
                                [--dtype float32|bfloat16] [--sync_every 1] [--peak_tflops X]
                                [--compile_cache DIR]
    python -m experiments.bench [--batch 64] [--steps 20] [--teacher resnet18] [--student mobilenetv2]
                                [--parallel jit] [--dtype float32] [--depthwise auto|xla|shift]
                                [--[no]augment] [--xla_option key=value] [--profile_dir DIR]
    python -m experiments.bench --list

Every case builds its step exactly as the trainer does (kdjax.train.Stage): models from
`kdjax.models`, terms from `kdjax.distill.build_terms`, `kdjax.optim.make_schedule` /
`make_optimizer`, the state from `kdjax.step.init_state` (the trainer's one init path), the step
from `kdjax.step.make_train_step` (or `make_eval_step`) wrapped by `DataParallel.wrap` over all
devices, with the donated state carried from step to step. The data are random images of the
data set's shape; teachers are randomly initialised (the same work as a trained one).

Per case the JSON (and the printed table) has: model pair, batch, dtype, backend, device kind,
jax version, compile seconds (trace + lower + XLA compile of the real step), init seconds,
images/s over the timed steps (median, min, max, quartiles, IQR; at least `--steps` steps after
`--warmup` warm-ups), FLOPs per image from XLA's cost analysis of the compiled step (per device
program, divided by the per-device batch) and the achieved FLOP/s (and MFU when `--peak_tflops`).

Cases (`--list`): kd_r18_mnv2, kd_r32x4_r8x4, teacher_cnn_small, kd_mlp, eval_forward (the
`--suite`), and kd_r34_r18_224, kd_r50_deit_s_224 (ImageNet shapes, by name with `--cases`: seconds
per step on a CPU; their PyTorch counterparts are torchvision's and timm's models).
The Fashion-MNIST cases (teacher_cnn_small, kd_mlp) take optimizer, learning rate, schedule and
temperature from experiments/configs/fashion_mnist.py, so they time that recipe's stages.

`--compare-torch` runs each case's PyTorch counterpart (experiments/torch_reference/) in a
long-lived subprocess of `--torch-python` (default: this interpreter if it can import torch) and
interleaves the two under the same load: after both sides have compiled and warmed up, the timed
steps are split into `--rounds` blocks per side, run alternately in ABBA order
(kdjax, torch, torch, kdjax, kdjax, ...), each block preceded by one untimed step. The reported
ratio is kdjax's median images/s over torch's (> 1: kdjax faster); per-round ratios show its
spread. `--torch-compile` adds `torch.compile`d models as a third contender. Thread counts are
left at each framework's default and recorded.

Never assert on these numbers in tests: they depend on the machine and its load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.jpegs import generate_jpegs
from kdjax import data as kdata
from kdjax import distill, models, optim, runtime
from kdjax import step as kstep

flags.DEFINE_bool("suite", False, "Run the benchmark suite (all cases, or those in --cases).")
flags.DEFINE_list("cases", [], "Suite cases to run (comma-separated; implies --suite). See --list.")
flags.DEFINE_bool("list", False, "List the suite's cases and exit.")
flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
flags.DEFINE_integer("batch", 64, "Global batch (single case; in the suite only when given explicitly).")
flags.DEFINE_integer("steps", 20, "Timed steps per contender (at least this many; after the warm-ups).")
flags.DEFINE_integer("warmup", 2, "Untimed warm-up steps after compiling.")
flags.DEFINE_integer("rounds", 0, "Interleaved blocks per contender (0: 4 with --compare-torch, else 1).")
flags.DEFINE_integer("sync_every", 1, "Steps per timing sample (one sync at its end); >1 lets an "
                     "accelerator's asynchronous dispatch overlap steps.")
flags.DEFINE_string("teacher", "resnet18", "Single case: teacher model (kdjax.models.MODELS); '' = none "
                    "(a teacher-training step: cross-entropy only).")
flags.DEFINE_string("student", "mobilenetv2", "Single case: student model (kdjax.models.MODELS).")
flags.DEFINE_enum("parallel", "jit", kstep.DataParallel.MODES, "Data-parallel wrapper.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("depthwise", "auto", ["auto", "xla", "shift"], "DepthwiseConv impl (students that have one).")
flags.DEFINE_bool("augment", True, "Single case: random crop (pad 4) + flip inside the step, as the CIFAR configs.")
flags.DEFINE_multi_string("xla_option", [], "XLA compile option key=value (repeatable), e.g. "
                          "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
flags.DEFINE_string("profile_dir", None, "If set, write a jax.profiler trace of 3 steady-state steps per case here.")
flags.DEFINE_string("compile_cache", "", "JAX persistent compilation cache directory ('' = off, the default): "
                    "run twice with the same directory to time a warm start's compile.")
flags.DEFINE_float("peak_tflops", 0.0, "The device's peak TFLOP/s for the dtype (e.g. 989 for H200 bf16 "
                   "dense); > 0 adds MFU = achieved / peak.")
flags.DEFINE_bool("compare_torch", False, "Interleave each case with its PyTorch eager counterpart.")
flags.DEFINE_alias("compare-torch", "compare_torch")
flags.DEFINE_string("torch_python", None, "Python interpreter with torch for --compare-torch "
                    "(default: this one, if it can import torch).")
flags.DEFINE_alias("torch-python", "torch_python")
flags.DEFINE_bool("torch_compile", False, "With --compare-torch: also time torch.compile'd models.")
flags.DEFINE_alias("torch-compile", "torch_compile")
flags.DEFINE_string("torch_device", None, "PyTorch device (default: 'cuda' when JAX runs on a GPU, else 'cpu').")
flags.DEFINE_bool("input_pipeline", False, "Time the streamed input pipeline (kdjax.data.stream: decode + "
                  "random-resized crop + flip + batch on Grain workers) instead of the steps; with --compare-torch, "
                  "interleaved with torchvision ImageFolder + DataLoader (same transforms and workers).")
flags.DEFINE_string("input_dir", None, "--input_pipeline: an image folder's train/ split (ROOT/train/<class>/...); "
                    "default: a generated folder of --input_images ImageNet-sized JPEGs")
flags.DEFINE_integer("input_images", 768, "--input_pipeline: JPEGs to generate (about 500 x 375, quality 90).")
flags.DEFINE_integer("input_size", 224, "--input_pipeline: crop side (random-resized crop).")
flags.DEFINE_list("input_workers", ["0", "1", "2"], "--input_pipeline: loader worker counts to time.")
flags.DEFINE_integer("input_batch", 64, "--input_pipeline: batch.")
flags.DEFINE_integer("input_batches", 6, "--input_pipeline: timed batches per round (after the first).")
FLAGS = flags.FLAGS

TORCH_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference", "step_server.py")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Shapes and normalisation of the data sets (constants, so no data set is needed).
DATA = {
    "cifar10": dict(image_shape=(32, 32, 3), num_classes=10, num_train=50000,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(image_shape=(32, 32, 3), num_classes=100, num_train=50000,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "fashion_mnist": dict(image_shape=(28, 28, 1), num_classes=10, num_train=60000, mean=(0.2860,), std=(0.3530,)),
    "imagenet": dict(image_shape=(224, 224, 3), num_classes=1000, num_train=1281167,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
# The ImageNet recipes' optimizers (experiments/configs/imagenet_resnet34_resnet18.py, imagenet_resnet50_deit.py)
IMAGENET_SGD = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, decay_all=False,
                    schedule="multistep", epochs=100, decay_epochs=(30, 60, 90), decay_factor=0.1)
DEIT_ADAMW = dict(name="adamw", lr=1e-3, weight_decay=0.05, decay_all=False, b1=0.9, b2=0.999, schedule="cosine",
                  epochs=300)
# Cases at 224 x 224: too slow for a CPU's --suite (seconds per step), run by name (experiments/gpu_bench.sh).
IMAGENET_CASES = ("kd_r34_r18_224", "kd_r50_deit_s_224")

# RepDistiller's CIFAR optimizer (SGD momentum 0.9, lr 0.05, wd 5e-4 on kernels, x0.1 at 150/180/210 of 240).
CIFAR_SGD = dict(name="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, decay_all=False,
                 schedule="multistep", epochs=240, decay_epochs=(150, 180, 210), decay_factor=0.1)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case. `optimizer` holds make_optimizer's arguments plus name, lr, schedule,
    epochs (the schedule's length) and decay_epochs/decay_factor (multistep)."""

    name: str
    description: str
    kind: str  # 'train' (kstep.make_train_step) or 'eval' (kstep.make_eval_step)
    student: str
    teacher: str | None  # None: no teacher (teacher training, or eval)
    data: str  # key of DATA
    batch: int
    optimizer: dict = dataclasses.field(default_factory=dict)
    augment: bool = False
    cached_teacher: bool = False  # the teacher's logits arrive in the batch (trainer's teacher cache)
    method: str = "kd"
    temperature: float = 4.0


def fashion_recipe() -> dict:
    """Optimizer, schedule and KD settings of experiments/configs/fashion_mnist.py, resolved."""
    from experiments.configs import fashion_mnist

    c = fashion_mnist.get_config()
    o = c.optimizer
    opt = dict(name=o.name, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
               decay_all=o.decay_all, b1=o.b1, b2=o.b2, eps=o.eps, schedule=o.schedule,
               decay_epochs=tuple(o.decay_epochs), decay_factor=o.decay_factor)
    tuned = o.get("tuned_learning_rates")  # as kdjax.train resolves a stage's rate
    tuned = tuned.to_dict() if hasattr(tuned, "to_dict") else dict(tuned or {})
    lr = lambda role: optim.resolve_learning_rate(o.name, o.learning_rate, c[role].learning_rate_scale, tuned)  # noqa: E731
    return {
        "teacher": dict(opt, lr=lr("teacher"), epochs=c.teacher.epochs), "teacher_model": c.teacher.model,
        "student": dict(opt, lr=lr("student"), epochs=c.student.epochs), "student_model": c.student.model,
        "batch": c.batch_size, "method": c.distill.method, "temperature": c.distill.temperature,
    }


def suite_cases() -> dict[str, Case]:
    fm = fashion_recipe()
    cases = [
        Case("kd_r18_mnv2", "KD step ResNet-18 -> MobileNetV2, CIFAR-10 shapes, SGD-Nesterov, crop+flip",
             "train", "mobilenetv2", "resnet18", "cifar10", 64,
             dict(CIFAR_SGD, nesterov=True, schedule="constant"), augment=True),
        Case("kd_r32x4_r8x4", "KD step resnet32x4 -> resnet8x4, CIFAR-100 shapes, RepDistiller recipe",
             "train", "resnet8x4", "resnet32x4", "cifar100", 64, dict(CIFAR_SGD), augment=True),
        Case("teacher_cnn_small", "teacher-training step (CE) of the Fashion-MNIST recipe, 28x28x1",
             "train", fm["teacher_model"], None, "fashion_mnist", fm["batch"], fm["teacher"], method="ce"),
        Case("kd_mlp", "KD step of the Fashion-MNIST recipe's MLP student, cached teacher logits",
             "train", fm["student_model"], fm["teacher_model"], "fashion_mnist", fm["batch"], fm["student"],
             cached_teacher=True, method=fm["method"], temperature=fm["temperature"]),
        Case("eval_forward", "eval-mode forward (the trainer's eval step) of ResNet-18, CIFAR-10 shapes",
             "eval", "resnet18", None, "cifar10", 256),
        Case("kd_r34_r18_224", "KD step ResNet-34 -> ResNet-18 (torchvision layouts), ImageNet shapes 224, "
             "the torchdistill/mdistiller recipe's optimizer (SGD 0.1, multistep), KD T=1",
             "train", "resnet18_imagenet", "resnet34_imagenet", "imagenet", 128, dict(IMAGENET_SGD),
             method="kd", temperature=1.0),
        Case("kd_r50_deit_s_224", "KD step ResNet-50 -> DeiT-S (distilled, the mean of its two heads), ImageNet "
             "shapes 224, DeiT's AdamW (1e-3, wd 0.05, cosine), KD T=1",
             "train", "deit_small_distilled_patch16", "resnet50_imagenet", "imagenet", 128, dict(DEIT_ADAMW),
             method="kd", temperature=1.0),
    ]
    return {c.name: c for c in cases}


def single_case() -> Case:
    teacher = FLAGS.teacher or None
    name = f"kd_{teacher}_{FLAGS.student}" if teacher else f"train_{FLAGS.student}"
    return Case(name, "single case from the command-line flags (CIFAR-10 shapes, SGD-Nesterov)", "train",
                FLAGS.student, teacher, "cifar10", FLAGS.batch, dict(CIFAR_SGD, nesterov=True, schedule="constant"),
                augment=FLAGS.augment, method="kd" if teacher else "ce")


# ----------------------------------------------------------------------------------------------
# The kdjax side


def make_model(name: str, num_classes: int, dtype, depthwise: str):
    model = models.get_model(name, num_classes, dtype=dtype, bn_axis_name=kstep.AXIS)
    if "depthwise_impl" in {f.name for f in dataclasses.fields(model)}:
        model = models.get_model(name, num_classes, depthwise_impl=depthwise, dtype=dtype, bn_axis_name=kstep.AXIS)
    return model


def schedule_spec(opt: dict, steps_per_epoch: int) -> dict:
    """The schedule as plain numbers (for the PyTorch side): name, total_steps, boundaries."""
    total = int(opt.get("epochs", 1)) * steps_per_epoch
    return {"name": opt.get("schedule", "constant"), "total_steps": total,
            "boundaries": [int(round(e * steps_per_epoch)) for e in opt.get("decay_epochs", ())],
            "factor": float(opt.get("decay_factor", 0.1))}


def optimizer_summary(o: dict) -> dict:
    """The settings that matter for optimizer `o` (the JSON's 'optimizer')."""
    keys = ["name", "lr", "weight_decay", "schedule"]
    keys += {"sgd": ["momentum", "nesterov"], "adam": ["b1", "b2", "eps"]}.get(o["name"], [])
    keys += ["decay_epochs", "decay_factor"] if o.get("schedule") == "multistep" else []
    return {k: o.get(k) for k in keys}


def _flops(compiled) -> float | None:
    """'flops' of XLA's cost analysis (a dict, or a list of dicts in some jax versions)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    flops = (ca or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


class JaxStep:
    """Case -> the trainer's compiled step with its arguments; `run(n)` times n steps."""

    def __init__(self, case: Case, dtype_name: str, parallel: str, depthwise: str, xla_options: dict | None):
        d = DATA[case.data]
        self.case, dtype = case, DTYPES[dtype_name]
        shape, nc = d["image_shape"], d["num_classes"]
        par = self.par = kstep.DataParallel(parallel)
        if case.batch % par.num_devices:
            raise ValueError(f"batch {case.batch} is not divisible by the {par.num_devices} devices")
        self.spe = kdata.steps_per_epoch(d["num_train"], case.batch)
        student = make_model(case.student, nc, dtype, depthwise)
        teachers, teacher_vars = (), ()
        if case.teacher:
            teacher = make_model(case.teacher, nc, dtype, depthwise)
            # Random teacher weights, built by one compiled function as the trainer builds its state
            # (eager, op by op, ResNet-18's took 8.7-9.5 s on the 2-core VM; jitted, 2.6-2.9 s).
            init = jax.jit(lambda key: models.init_model(teacher, key, shape),
                           compiler_options=kstep.INIT_COMPILER_OPTIONS.get(jax.default_backend()))
            teachers, teacher_vars = (teacher,), (init(jax.random.PRNGKey(2)),)
        if case.kind == "eval" or not case.teacher:
            terms = distill.build_terms({"method": "ce", "ce_weight": 1.0})  # as the trainer's teacher stage
        else:
            terms = distill.build_terms({"method": case.method, "temperature": case.temperature})
        distiller = distill.Distiller(terms)
        o = dict(case.optimizer) or dict(CIFAR_SGD)
        self.schedule_spec = schedule_spec(o, self.spe)
        schedule = optim.make_schedule(
            o["schedule"], base_lr=o["lr"], total_steps=self.schedule_spec["total_steps"], steps_per_epoch=self.spe,
            decay_epochs=tuple(o.get("decay_epochs", ())), decay_factor=o.get("decay_factor", 0.1))
        tx = optim.make_optimizer(
            o["name"], schedule, momentum=o.get("momentum", 0.9), nesterov=o.get("nesterov", False),
            weight_decay=o.get("weight_decay", 0.0), decay_all=o.get("decay_all", False),
            b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps"))
        self.optimizer = o
        cfg = kstep.StepConfig(mean=d["mean"], std=d["std"], steps_per_epoch=self.spe,
                               crop_padding=4 if case.augment else 0, flip=case.augment, dtype=dtype)

        t0 = time.perf_counter()
        state = kstep.init_state(student, distiller, teachers, teacher_vars, tx, shape, seed=0)
        jax.block_until_ready(state)
        self.init_s = time.perf_counter() - t0
        self.num_params = {"student": models.num_params(state.params["student"]),
                           "teacher": models.num_params(teacher_vars[0]["params"]) if teachers else 0}

        rng = np.random.default_rng(0)
        b = case.batch
        batch = {"image": rng.integers(0, 256, (b,) + shape, dtype=np.uint8),
                 "label": rng.integers(0, nc, (b,), dtype=np.int32)}
        if case.kind == "eval":
            batch["mask"] = np.ones((b,), np.float32)
            variables = {"params": state.params["student"], **state.model_state["student"]}
            fn = par.wrap(kstep.make_eval_step(student, cfg))
            self.args = [par.replicate(variables), par.shard(batch)]
            self.carry = False
        else:
            batch["index"] = np.arange(b, dtype=np.int32)
            step_teachers = teachers
            if case.cached_teacher:  # the trainer's teacher cache: outputs computed once, carried by the batch
                batch["teacher"] = kdata.teacher_cache(
                    "on", teachers, teacher_vars, terms, batch["image"], mean=d["mean"], std=d["std"], dtype=dtype,
                    obstacle=None, path="", chunk=b, write=False)
                step_teachers, teacher_vars = (), ()
            fn = par.wrap(kstep.make_train_step(student, distiller, step_teachers, tx, schedule, cfg),
                          donate_first=True)
            self.args = [par.replicate(state), par.replicate(teacher_vars), par.shard(batch)]
            self.carry = True

        t0 = time.perf_counter()
        self.compiled = fn.lower(*self.args).compile(xla_options or None)
        self.compile_s = time.perf_counter() - t0
        flops = _flops(self.compiled)
        per_device_batch = b // par.num_devices
        self.flops_per_image = flops / per_device_batch if flops else None

    def _step(self):
        out = self.compiled(*self.args)
        if self.carry:
            self.args[0] = out[0]
        return out

    def run(self, n: int, sync_every: int = 1) -> list[float]:
        """Seconds of each of n // sync_every samples of `sync_every` steps (one sync per sample)."""
        times = []
        for _ in range(max(1, n // sync_every)):
            t0 = time.perf_counter()
            for _ in range(sync_every):
                out = self._step()
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
        return times

    def profile(self, directory: str, n: int = 3) -> None:
        with jax.profiler.trace(directory):
            jax.block_until_ready([self._step() for _ in range(n)][-1])


# ----------------------------------------------------------------------------------------------
# The PyTorch side: a long-lived subprocess (experiments/torch_reference/step_server.py)


def default_torch_python() -> str | None:
    return sys.executable if importlib.util.find_spec("torch") is not None else None


class TorchServer:
    """JSON lines over a pipe to step_server.py: one request, one answer."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, TORCH_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def call(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch step server exited (status {self.proc.wait()}); see its stderr above")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"PyTorch step server: {answer.get('error')}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
            except (RuntimeError, BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def torch_spec(case: Case, js: JaxStep, dtype: str, device: str, compile_: bool, warmup: int) -> dict:
    d = DATA[case.data]
    o = js.optimizer
    terms = {"ce": 1.0, "kd": 0.0}
    if case.kind == "train" and case.teacher:
        built = {t.name: t.weight for t in distill.build_terms({"method": case.method, "temperature": case.temperature})}
        if set(built) - {"ce", "kd"}:
            raise ValueError(f"method {case.method!r}: the PyTorch reference implements only ce and kd")
        terms = {"ce": built.get("ce", 0.0), "kd": built.get("kd", 0.0)}
    return {
        "cmd": "setup", "kind": case.kind, "student": case.student, "teacher": case.teacher,
        "cached_teacher": case.cached_teacher, "image_shape": list(d["image_shape"]), "num_classes": d["num_classes"],
        "batch": case.batch, "mean": list(d["mean"]), "std": list(d["std"]), "dtype": dtype, "device": device,
        "compile": compile_, "warmup": warmup,
        "augment": {"crop_padding": 4 if case.augment else 0, "flip": case.augment},
        "optimizer": {k: o.get(k) for k in ("name", "lr", "momentum", "nesterov", "weight_decay", "decay_all",
                                            "b1", "b2", "eps")},
        "schedule": js.schedule_spec,
        "loss": {"ce_weight": terms["ce"], "kd_weight": terms["kd"], "temperature": case.temperature},
    }


# ----------------------------------------------------------------------------------------------
# Measuring


def stats(batch: int, sync_every: int, times: list[float]) -> dict:
    ips = np.array([batch * sync_every / t for t in times])
    q25, q50, q75 = np.percentile(ips, [25, 50, 75])
    return {"median": float(q50), "min": float(ips.min()), "max": float(ips.max()), "q25": float(q25),
            "q75": float(q75), "iqr": float(q75 - q25), "n": int(len(ips)),
            "step_ms_median": float(1e3 * np.median(times) / sync_every)}


def measure(case: Case, torch_servers: dict, steps: int, warmup: int, rounds: int, sync_every: int) -> dict:
    """Builds and compiles the kdjax step, sets up each PyTorch contender, then times them in
    interleaved ABBA blocks. Returns the case's result dict."""
    t_case = time.perf_counter()
    js = JaxStep(case, FLAGS.dtype, FLAGS.parallel, FLAGS.depthwise,
                 dict(o.split("=", 1) for o in FLAGS.xla_option) or None)
    dev = js.par.devices[0]
    result = {
        "case": case.name, "description": case.description, "kind": case.kind,
        "pair": f"{case.teacher} -> {case.student}" if case.teacher else case.student,
        "teacher": case.teacher, "student": case.student, "cached_teacher": case.cached_teacher,
        "data_shape": list(DATA[case.data]["image_shape"]), "num_classes": DATA[case.data]["num_classes"],
        "batch": case.batch, "dtype": FLAGS.dtype, "backend": jax.default_backend(), "device_kind": dev.device_kind,
        "num_devices": js.par.num_devices, "parallel": FLAGS.parallel, "jax_version": jax.__version__,
        "augment": case.augment, "optimizer": optimizer_summary(js.optimizer),
        "params": js.num_params, "init_s": js.init_s, "compile_s": js.compile_s,
        "flops_per_image": js.flops_per_image,
        "flops_per_step": js.flops_per_image * case.batch if js.flops_per_image else None,
    }
    print(f"[{case.name}] {result['pair']} batch {case.batch} {FLAGS.dtype}: init {js.init_s:.1f} s, "
          f"compile {js.compile_s:.1f} s, {(js.flops_per_image or 0) / 1e9:.3g} GFLOP/image", flush=True)
    if warmup:
        js.run(warmup)

    contenders = {"kdjax": js.run}
    for label, server in torch_servers.items():
        spec = torch_spec(case, js, FLAGS.dtype, FLAGS.torch_device, label == "torch_compile", warmup)
        info = server.call(**spec)
        result[label] = {k: info[k] for k in ("params", "bn_stats", "setup_s", "first_steps_s") if k in info}
        ok = info["params"]["student"] == js.num_params["student"] and (
            not case.teacher or case.cached_teacher or info["params"]["teacher"] == js.num_params["teacher"])
        result[label]["params_match_kdjax"] = bool(ok)
        if not ok:
            print(f"[{case.name}] WARNING: {label} parameter counts {info['params']} != kdjax {js.num_params}",
                  flush=True)
        contenders[label] = (lambda s: lambda n, k: s.call(cmd="run", steps=n, sync_every=k)["times"])(server)

    per_block = max(sync_every, -(-steps // rounds))
    per_block = -(-per_block // sync_every) * sync_every
    times = {name: [] for name in contenders}
    round_medians = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):  # ABBA: drift hits every side alike
            fn = contenders[name]
            fn(sync_every, sync_every)  # one untimed block warm-up: caches after the other side ran
            t = fn(per_block, sync_every)
            times[name] += t
            round_medians[name].append(float(np.median([case.batch * sync_every / x for x in t])))

    result["images_per_s"] = stats(case.batch, sync_every, times["kdjax"])
    med = result["images_per_s"]["median"]
    result["step_ms_median"] = result["images_per_s"]["step_ms_median"]
    result["achieved_flops_per_s"] = js.flops_per_image * med if js.flops_per_image else None
    if FLAGS.peak_tflops > 0 and result["achieved_flops_per_s"]:
        result["peak_tflops"] = FLAGS.peak_tflops
        result["mfu"] = result["achieved_flops_per_s"] / (FLAGS.peak_tflops * 1e12)
    for label in torch_servers:
        s = stats(case.batch, sync_every, times[label])
        result[label].update(images_per_s=s, ratio_kdjax_over_torch=med / s["median"],
                             round_ratios=[a / b for a, b in zip(round_medians["kdjax"], round_medians[label])],
                             achieved_flops_per_s=js.flops_per_image * s["median"] if js.flops_per_image else None)
    result["timing"] = {"warmup": warmup, "rounds": rounds, "steps_per_block": per_block, "sync_every": sync_every,
                        "order": "ABBA" if len(contenders) > 1 else "single block"}
    if FLAGS.profile_dir:
        js.profile(os.path.join(FLAGS.profile_dir, case.name))
    result["case_s"] = time.perf_counter() - t_case
    result["loadavg_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def environment(torch_info: dict | None, torch_note: str | None) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), cpu)
        avx512 = any(l.startswith("flags") and "avx512f" in l for l in lines)
    except OSError:
        avx512 = None
    import flax
    import jaxlib

    env = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(), "python": platform.python_version(),
        "cpu": cpu, "avx512": avx512, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **{switch.lower(): os.environ.get(switch, on) for switch, on, *_ in runtime.CPU_FLAGS},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),  # the host allocator (kdjax.runtime.relaunch_with_allocator)
        "jax_threads": "XLA default (one intra-op thread per core)",
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "command": " ".join(sys.argv),
    }
    if torch_info is not None:
        env["torch"] = torch_info
    if torch_note:
        env["torch_note"] = torch_note
    return env


def format_table(results: list[dict]) -> str:
    head = ("case", "pair", "batch", "dtype", "compile s", "img/s median [IQR]", "GFLOP/img", "GFLOP/s",
            "torch img/s", "kdjax/torch")
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append((r["case"], "error: " + r["error"][:80], "", "", "", "", "", "", "", ""))
            continue
        ips = r["images_per_s"]
        t = r.get("torch")
        fpi, fps = r.get("flops_per_image"), r.get("achieved_flops_per_s")
        rows.append((
            r["case"], r["pair"], str(r["batch"]), r["dtype"], f"{r['compile_s']:.1f}",
            f"{ips['median']:.1f} [{ips['q25']:.1f}-{ips['q75']:.1f}]",
            f"{fpi / 1e9:.3g}" if fpi else "-", f"{fps / 1e9:.3g}" if fps else "-",
            f"{t['images_per_s']['median']:.1f}" if t else "-",
            f"{t['ratio_kdjax_over_torch']:.2f}x" if t else "-",
        ))
        if "torch_compile" in r:
            tc = r["torch_compile"]
            rows.append(("", "  torch.compile", "", "", "", "", "", "", f"{tc['images_per_s']['median']:.1f}",
                         f"{tc['ratio_kdjax_over_torch']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.list:
        for c in suite_cases().values():
            print(f"{c.name:18s} {c.description}")
        return
    if FLAGS.steps < 1 or FLAGS.warmup < 0 or FLAGS.sync_every < 1 or FLAGS.rounds < 0:
        _fail("--steps and --sync_every must be >= 1, --warmup and --rounds >= 0")
    if FLAGS.input_pipeline:
        env = environment(None, None)
        print(f"cpu={env['cpu']} cores={env['cpu_affinity']} load={env['loadavg']}")
        result = {"environment": env, **input_pipeline(FLAGS.rounds or (2 if FLAGS.compare_torch else 1))}
        if FLAGS.out:
            _write(FLAGS.out, result)
            print(f"\nwritten to {FLAGS.out}")
        return
    if FLAGS.suite or FLAGS.cases:
        available = suite_cases()
        unknown = [n for n in FLAGS.cases if n not in available]
        if unknown:
            _fail(f"unknown case(s) {', '.join(unknown)}; choose from: {', '.join(available)}")
        cases = ([available[n] for n in FLAGS.cases] if FLAGS.cases
                 else [c for n, c in available.items() if n not in IMAGENET_CASES])
        if FLAGS["batch"].present:
            cases = [dataclasses.replace(c, batch=FLAGS.batch) for c in cases]
    else:
        cases = [single_case()]
    try:  # an unknown --teacher / --student: the model registry's one line, before any JAX work
        for c in cases:
            for name in filter(None, (c.student, c.teacher)):
                models.get_model(name, 10)
    except ValueError as e:
        _fail(e)
    if FLAGS.torch_device is None:
        FLAGS.torch_device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    rounds = FLAGS.rounds or (4 if FLAGS.compare_torch else 1)
    if FLAGS.compile_cache:
        runtime.enable_compilation_cache(FLAGS.compile_cache)

    servers, torch_info, note = {}, None, None
    if FLAGS.compare_torch:
        python = FLAGS.torch_python or default_torch_python()
        if python is None:
            note = ("--compare-torch skipped: this interpreter cannot import torch; pass --torch-python "
                    "with a Python that has torch")
        else:
            labels = ["torch"] + (["torch_compile"] if FLAGS.torch_compile else [])
            for label in labels:
                servers[label] = TorchServer(python)
            torch_info = servers["torch"].call(cmd="info", device=FLAGS.torch_device)
            torch_info.pop("ok", None)
            torch_info["python"] = python
    elif FLAGS.torch_compile:
        note = "--torch-compile has no effect without --compare-torch"
    env = environment(torch_info, note)
    print(f"backend={env['backend']} devices={env['device_count']} ({env['device_kind']}) jax={env['jax']} "
          f"cpu={env['cpu']} cores={env['cpu_affinity']} load={env['loadavg']}")
    print(f"XLA_FLAGS={env['xla_flags']!r}; XLA:CPU threads: {env['jax_threads']}; LD_PRELOAD={env['ld_preload']!r}")
    if torch_info:
        print(f"torch {torch_info['torch']} on {torch_info['device']}: {torch_info['threads']} intra-op / "
              f"{torch_info['interop_threads']} inter-op threads (defaults), python {torch_info['python']}")
    if note:
        print(note)
    cores = env["cpu_affinity"] or env["cpu_count"] or 1
    if env["loadavg"] and env["loadavg"][0] > 0.5 * cores:
        print(f"WARNING: the machine is busy (1-minute load {env['loadavg'][0]:.1f} on {cores} cores): CPU timings "
              "are unreliable, PyTorch's especially (its OpenMP threads stall at every barrier while one of "
              "them is descheduled); measure on a quiet machine")
    print(f"timing: {FLAGS.steps}+ steps per contender after {FLAGS.warmup} warm-ups, {rounds} round(s)"
          + (" interleaved ABBA" if servers else ""), flush=True)

    results, failed = [], False
    try:
        for case in cases:
            try:
                results.append(measure(case, servers, FLAGS.steps, FLAGS.warmup, rounds, FLAGS.sync_every))
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                if len(cases) == 1:
                    raise
                failed = True
                results.append({"case": case.name, "error": f"{type(e).__name__}: {e}"})
                print(f"[{case.name}] FAILED: {type(e).__name__}: {e}", flush=True)
            if FLAGS.out:  # after every case: a killed run keeps what it measured
                _write(FLAGS.out, {"environment": env, "cases": results})
    finally:
        for s in servers.values():
            s.close()
    print()
    print(format_table(results))
    if FLAGS.out:
        print(f"\nwritten to {FLAGS.out}")
    if failed:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------
# Input-pipeline cases (--input_pipeline)

TORCH_LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference", "imagefolder_loader.py")


def _kdjax_loader_round(split, workers: int, batch: int, batches: int, seed: int) -> dict:
    from kdjax.data import stream

    start = time.perf_counter()
    loader = stream.TrainLoader(split, batch, seed=seed, start_step=0, total_steps=batches + 1,
                                steps_per_epoch=len(split) // batch, flip=True, workers=workers)
    try:
        next(loader)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            out = next(loader)
        seconds = time.perf_counter() - start
    finally:
        loader.close()
    assert out["image"].dtype == np.uint8 and out["image"].shape[0] == batch
    return {"first_batch_s": first, "images_per_sec": batch * batches / seconds}


def _torch_loader_round(python: str, root: str, workers: int, batch: int, batches: int, size: int, seed: int) -> dict:
    proc = subprocess.run([python, TORCH_LOADER, root, str(workers), str(batch), str(batches), str(size), str(seed)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{TORCH_LOADER} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def input_pipeline(rounds: int) -> dict:
    """Images/s of kdjax's streamed loader per worker count, interleaved ABBA with torchvision's
    ImageFolder + DataLoader when --compare-torch (each torch round a fresh process: its import is
    not timed, its workers' start is in first_batch_s as Grain's is)."""
    from kdjax.data import folder as kfolder
    from kdjax.data import stream

    try:
        workers = [stream.check_workers(int(w)) for w in FLAGS.input_workers]
    except ValueError as e:
        _fail(e)
    if FLAGS.input_batch < 1 or FLAGS.input_batches < 1 or FLAGS.input_images < FLAGS.input_batch * (FLAGS.input_batches + 1):
        _fail(f"--input_images={FLAGS.input_images} must hold --input_batches + 1 = {FLAGS.input_batches + 1} batches "
              f"of --input_batch={FLAGS.input_batch}")
    if FLAGS.input_dir:
        train = os.path.abspath(FLAGS.input_dir)
        if not os.path.isdir(train):
            _fail(f"--input_dir {train} is not a folder")
    else:
        import tempfile

        train = generate_jpegs(os.path.join(tempfile.gettempdir(), f"kdjax-bench-jpegs-{FLAGS.input_images}"),
                               FLAGS.input_images)
    classes, files, labels, _ = kfolder._scan(train, None)
    if not files:
        _fail(f"{train} has no class folders of .jpg/.jpeg/.png images")
    split = kfolder.FileSplit(tuple(files), np.asarray(labels, np.int32), FLAGS.input_size, True)
    python = None
    if FLAGS.compare_torch:
        python = FLAGS.torch_python or default_torch_python()
        if python is None:
            print("--compare-torch skipped: this interpreter cannot import torch; pass --torch-python")
    sizes = [os.path.getsize(f) for f in files]
    print(f"input pipeline: {len(files)} images in {len(classes)} classes under {train} (mean {np.mean(sizes) / 1e3:.0f} "
          f"kB), crop {FLAGS.input_size}, batch {FLAGS.input_batch}, {FLAGS.input_batches} timed batches per round, "
          f"{rounds} round(s) per contender" + (" interleaved ABBA" if python else ""), flush=True)
    from PIL import __version__ as pil_version

    rows = []
    for w in workers:
        samples = {"kdjax": [], "torch": []}
        meta = {}
        order = ["kdjax", "torch", "torch", "kdjax"] * ((rounds + 1) // 2) if python else ["kdjax"] * rounds
        for r, who in enumerate(order[: 2 * rounds if python else rounds]):
            if who == "kdjax":
                out = _kdjax_loader_round(split, w, FLAGS.input_batch, FLAGS.input_batches, seed=r)
            else:
                out = _torch_loader_round(python, train, w, FLAGS.input_batch, FLAGS.input_batches, FLAGS.input_size, r)
                meta = {k: out[k] for k in ("torch", "torchvision")}
            samples[who].append(out)
            print(f"  workers={w} round {r} {who:6s}: {out['images_per_sec']:7.1f} images/s "
                  f"(first batch {out['first_batch_s']:.2f} s)", flush=True)
        row = {"case": f"input_rrc{FLAGS.input_size}_workers{w}", "workers": w, "batch": FLAGS.input_batch,
               "decoder": f"PIL {pil_version}"}
        for who, got in samples.items():
            if got:
                ips = [g["images_per_sec"] for g in got]
                row[who] = {"images_per_sec_median": float(np.median(ips)), "images_per_sec": ips,
                            "images_per_sec_per_core": float(np.median(ips)) / max(1, w),
                            "first_batch_s_median": float(np.median([g["first_batch_s"] for g in got]))}
        if samples["torch"]:
            row["torch"].update(meta)
            row["ratio_vs_torch"] = row["kdjax"]["images_per_sec_median"] / row["torch"]["images_per_sec_median"]
        rows.append(row)
    print()
    print(f"{'case':24s} {'kdjax img/s':>12s} {'per core':>9s} {'torch img/s':>12s} {'ratio':>6s}")
    for row in rows:
        t = row.get("torch", {})
        print(f"{row['case']:24s} {row['kdjax']['images_per_sec_median']:12.1f} "
              f"{row['kdjax']['images_per_sec_per_core']:9.1f} "
              + (f"{t['images_per_sec_median']:12.1f} {row['ratio_vs_torch']:6.2f}" if t else f"{'-':>12s} {'-':>6s}"))
    return {"input_cases": rows, "images": len(files), "mean_file_kb": float(np.mean(sizes) / 1e3), "root": train}


def _fail(message) -> None:
    """A user mistake on the command line: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _write(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x))
    os.replace(tmp, path)


if __name__ == "__main__":
    from experiments import launch

    launch.relaunch()
    app.run(main)

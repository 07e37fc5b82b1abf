"""Throughput of kdjax's real distillation train step on random CIFAR-shaped data.

    python -m experiments.bench [--batch 64] [--steps 10] [--teacher resnet18] [--student mobilenetv2]
                                [--parallel jit] [--dtype float32] [--depthwise auto|xla|shift]

Builds the step exactly as ``kdjax.train.Stage`` does (frozen eval-mode teacher, KD T=4 with
0.9*KD + 0.1*CE, SGD-Nesterov lr 0.05 wd 5e-4, SyncBN over the data axis, crop+flip augmentation)
and prints the first step's compile time and the steady-state images/s (median over ``--steps``
timed steps after 2 warm-ups). The PyTorch eager counterpart is shared/bench/torch_kd_step.py.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from kdjax import distill, models, optim
from kdjax import step as kstep

flags.DEFINE_integer("batch", 64, "Global batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-ups).")
flags.DEFINE_string("teacher", "resnet18", "Teacher model (kdjax.models.MODELS).")
flags.DEFINE_string("student", "mobilenetv2", "Student model (kdjax.models.MODELS).")
flags.DEFINE_enum("parallel", "jit", kstep.DataParallel.MODES, "Data-parallel wrapper.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("depthwise", "auto", ["auto", "xla", "shift"], "DepthwiseConv impl (students that have one).")
flags.DEFINE_bool("augment", True, "Random crop (pad 4) + flip inside the step, as the CIFAR configs.")
flags.DEFINE_multi_string("xla_option", [], "XLA compile option key=value (repeatable), e.g. "
                          "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")
flags.DEFINE_string("profile_dir", None, "If set, write a jax.profiler trace of 3 steady-state steps here.")
FLAGS = flags.FLAGS

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGE_SHAPE, NUM_CLASSES = (32, 32, 3), 10


def make_model(name, dtype):
    kw = {"dtype": dtype, "bn_axis_name": kstep.AXIS}
    model = models.get_model(name, NUM_CLASSES, **kw)
    if "depthwise_impl" in {f.name for f in dataclasses.fields(model)}:
        model = models.get_model(name, NUM_CLASSES, depthwise_impl=FLAGS.depthwise, **kw)
    return model


def init_state(student, teacher, teacher_vars, distiller, tx):
    """The TrainState of kdjax.train.Stage._init (fresh student, distiller adapters if any)."""
    key_model, key_distiller = jax.random.split(jax.random.PRNGKey(0))
    x = jnp.zeros((2,) + IMAGE_SHAPE, jnp.float32)
    variables = dict(student.init(key_model, x, train=False))
    s_params = variables.pop("params")
    _, s_feats, _ = models.apply_model(student, {"params": s_params, **variables}, x, train=False)
    t_feats = kstep.teacher_features((teacher,), (teacher_vars,), x)
    distill.check_features(distiller.terms, s_feats, t_feats)
    ctx = distill.Context(labels=jnp.zeros((2,), jnp.int32), train=False, indices=jnp.zeros((2,), jnp.int32),
                          rng=key_distiller)
    d_vars = dict(distiller.init(key_distiller, s_feats, t_feats, ctx))
    params = {"student": s_params, "distiller": d_vars.pop("params", {})}
    return kstep.TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        model_state={"student": variables, "distiller": d_vars},
        opt_state=tx.init(params), rng=jax.random.PRNGKey(1),
    )


def main(_):
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
    par = kstep.DataParallel(FLAGS.parallel)
    teacher, student = make_model(FLAGS.teacher, dtype), make_model(FLAGS.student, dtype)
    teacher_vars = models.init_model(teacher, jax.random.PRNGKey(2), IMAGE_SHAPE)  # frozen, random
    distiller = distill.Distiller(distill.build_terms({"method": "kd", "temperature": 4.0}))
    schedule = optax.constant_schedule(0.05)
    tx = optim.make_optimizer("sgd", schedule, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = kstep.StepConfig(mean=CIFAR10_MEAN, std=CIFAR10_STD, steps_per_epoch=1000,
                           crop_padding=4 if FLAGS.augment else 0, flip=FLAGS.augment, dtype=dtype)
    train_step = par.wrap(kstep.make_train_step(student, distiller, (teacher,), tx, schedule, cfg),
                          donate_first=True)

    rng = np.random.default_rng(0)
    b = FLAGS.batch
    batch = par.shard({
        "image": rng.integers(0, 256, (b,) + IMAGE_SHAPE, dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (b,), dtype=np.int32),
        "index": np.arange(b, dtype=np.int32),
    })
    state = par.replicate(init_state(student, teacher, teacher_vars, distiller, tx))
    teacher_vars = par.replicate((teacher_vars,))

    print(f"backend={jax.default_backend()} devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
          f"jax={jax.__version__}")
    print(f"config: teacher={FLAGS.teacher} student={FLAGS.student} batch={b} parallel={FLAGS.parallel} "
          f"dtype={FLAGS.dtype} depthwise={FLAGS.depthwise} augment={FLAGS.augment} "
          f"student_params={models.num_params(state.params['student'])} xla_options={FLAGS.xla_option}")

    t0 = time.perf_counter()
    options = dict(o.split("=", 1) for o in FLAGS.xla_option) or None
    train_step = train_step.lower(state, teacher_vars, batch).compile(options)
    print(f"compile (trace + lower + XLA): {time.perf_counter() - t0:.1f} s")

    times = []
    for i in range(2 + FLAGS.steps):
        t0 = time.perf_counter()
        state, metrics = train_step(state, teacher_vars, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if FLAGS.profile_dir:
        with jax.profiler.trace(FLAGS.profile_dir):
            for _ in range(3):
                state, metrics = train_step(state, teacher_vars, batch)
                jax.block_until_ready(metrics)
    med = float(np.median(times))
    print(f"step: median {1e3 * med:.1f} ms (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}) "
          f"-> {b / med:.1f} img/s; loss={float(par.unreplicate(metrics)['loss']):.4f}")


if __name__ == "__main__":
    app.run(main)

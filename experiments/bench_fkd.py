"""The student stage with the teacher's soft labels stored (distill.cache_teacher='on' on a streamed
data set, kdjax.data.store, FKD) against the teacher in every step, interleaved (ABAB).

    python -m experiments.bench_fkd [--out fkd.json] [--rounds 2] [--images 64] [--epochs 2] [--batch 16]
                                    [--size 224] [--workers 1] [--top_k 0]

A generated folder of ImageNet-like JPEGs (experiments.jpegs.generate_jpegs: about 500 x 375, 4
classes; `--images` in train/, a quarter as many in val/) and a randomly initialised torchvision
ResNet-34 (the teacher, its 4-class weights used as they are: teacher.epochs=0) distilled into a
ResNet-18 from scratch (`resnet34_imagenet` -> `resnet18_imagenet`, kd), each contender a fresh
`python -m experiments.digits` run of the 'student' stage only (no compilation cache), in the order
off, on, off, on, ... Per run: the steady-state seconds per step (median over the steps after the
first two of each epoch, from the trainer's per-step log timestamps: each logged step syncs, in
both contenders alike), the store's computation (summary.json's teacher_cache_seconds_this_session)
and the stage's whole wall time. Needs torch + torchvision (for the teacher's weights file).

Never assert on these numbers in tests: they depend on the machine and its load.
"""

import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments.jpegs import generate_jpegs

FLAGS = flags.FLAGS
flags.DEFINE_string("root", "/tmp/kdjax_bench_fkd", "Folder for the generated images, the weights and the runs.")
flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
flags.DEFINE_integer("rounds", 2, "ABAB rounds (each: one teacher-in-the-step run, one store run).")
flags.DEFINE_integer("images", 64, "Training images to generate (a quarter as many for val/).")
flags.DEFINE_integer("epochs", 2, "Student epochs per run.")
flags.DEFINE_integer("batch", 16, "Global batch.")
flags.DEFINE_integer("size", 224, "Crop side (dataset.image_size).")
flags.DEFINE_integer("workers", 1, "dataset.loader_workers.")
flags.DEFINE_integer("top_k", 0, "distill.cache_top_k of the store runs (0: unset, all 4 classes).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^[IWD](\d{4}) (\d\d:\d\d:\d\d\.\d+) .*\[student\] train step (\d+) ")


def prepare(root: str, images: int) -> str:
    """The image folder (train/ and val/) and the teacher's weights file, reused when present."""
    generate_jpegs(root, images)
    val = os.path.join(root, "val")
    if not os.path.exists(val):
        os.symlink(generate_jpegs(os.path.join(root, "_val"), max(4, images // 4), seed=1), val)
    weights = os.path.join(root, "resnet34_4classes.safetensors")
    if not os.path.exists(weights):
        import torch
        import torchvision
        from safetensors import torch as safetensors_torch

        torch.manual_seed(0)
        state = torchvision.models.resnet34(num_classes=4).state_dict()
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, weights)
    return weights


def one_run(root: str, weights: str, workdir: str, mode: str) -> dict:
    args = [f"--workdir={workdir}", "--config.dataset.name=folder", f"--config.dataset.data_dir={root}",
            f"--config.dataset.image_size={FLAGS.size}", f"--config.dataset.loader_workers={FLAGS.workers}",
            "--config.augment.flip=True", "--config.teacher.model=resnet34_imagenet",
            f"--config.teacher.weights={weights}", "--config.teacher.epochs=0", "--config.student.model=resnet18_imagenet",
            f"--config.student.epochs={FLAGS.epochs}", "--config.stages=student", f"--config.batch_size={FLAGS.batch}",
            "--config.eval_batch_size=16", "--config.throughput_batch=4", "--config.log_every_steps=1",
            "--config.log.report=False", "--config.log.progress=False", "--config.compile_cache_dir=",
            f"--config.distill.cache_teacher={mode}", "--verbosity=1"]
    if mode == "on" and FLAGS.top_k:
        args.append(f"--config.distill.cache_top_k={FLAGS.top_k}")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.digits", *args], cwd=REPO, capture_output=True, check=False,
                          text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"the {mode} run failed: {proc.stderr[-2000:]}")
    stamps = {}
    for line in proc.stderr.splitlines():
        if m := STEP_LINE.match(line):
            stamps[int(m.group(3))] = datetime.datetime.strptime(m.group(2), "%H:%M:%S.%f")
    spe = FLAGS.images // FLAGS.batch
    # steps 1, 2 of an epoch: the compile and the first steps after the epoch's evaluation
    gaps = [(stamps[s] - stamps[s - 1]).total_seconds() for s in sorted(stamps) if s - 1 in stamps and (s - 1) % spe >= 2]
    with open(os.path.join(workdir, "summary.json")) as f:
        student = json.load(f)["student"]
    return {"mode": mode, "step_seconds_median": statistics.median(gaps), "step_seconds": gaps,
            "images_per_sec": FLAGS.batch / statistics.median(gaps),
            "store_seconds": student.get("teacher_cache_seconds_this_session"),
            "train_seconds": student["train_seconds_this_session"], "process_wall_seconds": round(wall, 2)}


def main(argv):
    del argv
    root = FLAGS.root
    weights = prepare(root, FLAGS.images)
    runs = []
    for r in range(FLAGS.rounds):
        for mode in ("off", "on"):
            workdir = os.path.join(root, "runs", f"{int(time.time())}_{r}_{mode}")
            runs.append(dict(one_run(root, weights, workdir, mode), round=r))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "step_seconds"}), flush=True)
    ratios = [a["step_seconds_median"] / b["step_seconds_median"] for a, b in zip(runs[::2], runs[1::2])]
    result = {"machine": {"cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg()},
              "settings": {k: FLAGS[k].value for k in ("images", "epochs", "batch", "size", "workers", "top_k")},
              "runs": runs, "step_speedup_per_round": ratios}
    print(f"student step, teacher in the step / store: {', '.join(f'{x:.2f}x' for x in ratios)}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)

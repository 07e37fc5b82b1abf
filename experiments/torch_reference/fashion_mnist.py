"""The Fashion-MNIST recipe of experiments/configs/fashion_mnist.py in plain PyTorch (eager, CPU or GPU).

    python experiments/torch_reference/fashion_mnist.py --data /usr/share/datasets/fashion-mnist \
        [--teacher-epochs 3] [--student-epochs 5] [--batch 128] [--teacher-lr 1e-3] [--student-lr 1e-3] \
        [--temperature 4] [--ce-weight 0.1] [--kd-weight 0.9] [--json out.json]

Three stages, as kdjax's trainer runs them: the cnn_small teacher from labels, the MLP student
distilled from the frozen eval-mode teacher (ce_weight * CE + kd_weight * T^2 * KL), and the same
student from scratch. Same models and initialisation (models.py), Adam (torch defaults = kdjax's),
cosine decay to 0 over each stage stepped every update, batch 128, no augmentation, the same data
order (epoch e visits np.random.default_rng((seed, e)).permutation(60000), the remainder dropped),
test accuracy after every epoch (eval batch 500). The teacher runs in every step, as RepDistiller
does; `--cache-teacher` instead computes its logits once (what kdjax's distill.cache_teacher does).

It imports nothing from kdjax: the defaults above are the recipe's values when written, and
`compare_fashion_mnist.py` passes the values the kdjax config resolves to at run time (the
learning rate among them). Prints each stage's seconds and accuracies and the total; `--json` writes them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import models  # noqa: E402

ROLES = ("teacher", "student_init", "student", "student_scratch")  # kdjax.train.ROLES: stage seeds


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(folder: str):
    def find(stem):
        for name in (stem + ".gz", stem):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise SystemExit(f"error: {folder} lacks {stem}(.gz); apt-get install dataset-fashion-mnist")

    tr_x, tr_y, te_x, te_y = (read_idx(find(s)) for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    tr_x, te_x = tr_x[..., None], te_x[..., None]  # NHWC, C = 1
    x = tr_x.astype(np.float64) / 255.0  # kdjax.data: population mean/std of the train pixels
    mean, std = (float(x.mean()),), (float(x.std()),)
    t = lambda a, dtype=None: torch.from_numpy(np.array(a, dtype=dtype))  # a writable copy  # noqa: E731
    return t(tr_x), t(tr_y, np.int64), t(te_x), t(te_y, np.int64), mean, std


def evaluate(model, images, labels, mean, std, batch: int) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(labels), batch):
            logits = model(common.normalize(images[s:s + batch], mean, std))
            correct += int((logits.argmax(-1) == labels[s:s + batch]).sum())
    return correct / len(labels)


def train_stage(role, model_name, epochs, lr, a, data, teacher=None, teacher_logits=None) -> tuple:
    tr_x, tr_y, te_x, te_y, mean, std = data
    torch.manual_seed(a.seed + ROLES.index(role) * 1000)
    model = models.get_model(model_name, 10, (28, 28, 1))
    n = len(tr_y)
    spe = n // a.batch
    opt = common.make_optimizer(model, {"name": "adam", "lr": lr, "weight_decay": a.weight_decay,
                                        "b1": a.b1, "b2": a.b2, "eps": a.eps})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, common.lr_factor({"name": "cosine", "total_steps": epochs * spe}))
    distil = teacher is not None or teacher_logits is not None
    ce_w, kd_w = (a.ce_weight, a.kd_weight) if distil else (1.0, 0.0)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(np.random.default_rng((a.seed, epoch)).permutation(n))
        for i in range(spe):
            idx = order[i * a.batch:(i + 1) * a.batch]
            x = common.normalize(tr_x[idx], mean, std)
            t_logits = None
            if teacher_logits is not None:
                t_logits = teacher_logits[idx]
            elif teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = common.kd_objective(model(x), tr_y[idx], t_logits, ce_w, kd_w, a.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        last = float(loss.detach())
        if not math.isfinite(last):
            raise SystemExit(f"error: non-finite loss in stage {role}, epoch {epoch}")
        history.append(evaluate(model, te_x, te_y, mean, std, a.eval_batch))
        print(f"[{role}] epoch {epoch + 1}/{epochs}: loss {last:.4f} test accuracy {history[-1]:.4f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    seconds = time.perf_counter() - t0
    result = {"model": model_name, "epochs": epochs, "steps": epochs * spe, "lr": lr, "seconds": seconds,
              "test_accuracy": history[-1], "best_test_accuracy": max(history), "history": history,
              "num_params": models.num_params(model), "terms": {"ce": ce_w, "kd": kd_w} if distil else {"ce": 1.0}}
    return model.eval(), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the four IDX archives")
    p.add_argument("--teacher-model", default="cnn_small")
    p.add_argument("--student-model", default="mlp")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--student-epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--student-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0, help="coupled L2 on kernels (kdjax's default mask)")
    p.add_argument("--b1", type=float, default=0.9)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-teacher", action="store_true", help="compute the teacher's logits once, before the KD stage")
    p.add_argument("--stages", default="teacher,student,student_scratch")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()

    print(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} "
          f"inter-op threads (defaults)", flush=True)
    t = time.perf_counter()
    data = load(a.data)
    load_s = time.perf_counter() - t
    print(f"data: {len(data[1])} train / {len(data[3])} test from {a.data} ({load_s:.1f} s); mean {data[4][0]:.4f} "
          f"std {data[5][0]:.4f}", flush=True)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    results, teacher = {}, None
    for role in stages:
        if role == "teacher":
            teacher, results[role] = train_stage(role, a.teacher_model, a.teacher_epochs, a.teacher_lr, a, data)
            for q in teacher.parameters():
                q.requires_grad_(False)
        elif role == "student":
            if teacher is None:
                raise SystemExit("error: stage 'student' needs the teacher stage first")
            cached, extra = None, 0.0
            if a.cache_teacher:
                t = time.perf_counter()
                with torch.inference_mode():
                    tr_x, mean, std = data[0], data[4], data[5]
                    cached = torch.cat([teacher(common.normalize(tr_x[s:s + a.eval_batch], mean, std))
                                        for s in range(0, len(tr_x), a.eval_batch)])
                extra = time.perf_counter() - t
            _, results[role] = train_stage(role, a.student_model, a.student_epochs, a.student_lr, a, data,
                                           teacher=None if a.cache_teacher else teacher, teacher_logits=cached)
            results[role]["seconds"] += extra
            results[role]["teacher_cache"] = a.cache_teacher
        elif role == "student_scratch":
            _, results[role] = train_stage(role, a.student_model, a.student_epochs, a.student_lr, a, data)
        else:
            raise SystemExit(f"error: unknown stage {role!r}")
    total = time.perf_counter() - T_START
    print()
    print(f"{'stage':16s} {'model':10s} {'seconds':>8s} {'test acc (last)':>16s} {'(best)':>8s}")
    for role, r in results.items():
        print(f"{role:16s} {r['model']:10s} {r['seconds']:8.1f} {r['test_accuracy']:16.4f} {r['best_test_accuracy']:8.4f}")
    stage_s = sum(r["seconds"] for r in results.values())
    print(f"stages total {stage_s:.1f} s; whole process {total:.1f} s (torch import and data loading included)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "args": vars(a), "stages": results, "stages_seconds": stage_s, "data_load_s": load_s,
                       "process_seconds": total}, f, indent=2)


if __name__ == "__main__":
    main()

"""PyTorch counterpart of an experiments.bench case, timed on request: a long-lived process that
reads one JSON request per line on stdin and answers one JSON line on stdout.

    python experiments/torch_reference/step_server.py      # started by experiments.bench --compare-torch

Requests:
  {"cmd": "info", "device": "cpu"}      torch version, thread counts, device, TF32 settings
  {"cmd": "setup", ...}                 build a case's step (the fields experiments.bench.torch_spec
                                        writes), run its warm-up steps; answers parameter counts
  {"cmd": "run", "steps": n, "sync_every": k}
                                        time n steps: seconds of each sample of k steps, with one
                                        device synchronisation at the end of each sample
  {"cmd": "quit"}

The step does what kdjax's does (kdjax.step.make_train_step): uint8 NHWC batch -> random crop +
flip (when the case augments) -> normalise -> frozen eval-mode teacher under no_grad (or its logits
cached in the batch) -> student in train mode -> CE + KD -> backward -> SGD / Adam with kdjax's
weight-decay mask -> per-step learning-rate schedule. An eval case is the trainer's eval step:
eval-mode forward, correct count and summed cross-entropy. `"dtype": "bfloat16"` runs the models
under autocast (float32 parameters and BatchNorm statistics, like kdjax's `dtype`); `"compile":
true` wraps the models in torch.compile. Thread counts stay at PyTorch's defaults.

Only the protocol goes to stdout (the real stdout is kept for it and fd 1 is pointed at stderr, so
nothing torch prints can corrupt it).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
import models  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """One case's step; `__call__` runs one step."""

    def __init__(self, spec: dict):
        self.device = dev = torch.device(spec.get("device", "cpu"))
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(int(spec.get("seed", 0)))
        shape, nc, b = tuple(spec["image_shape"]), int(spec["num_classes"]), int(spec["batch"])
        self.kind = spec["kind"]
        self.mean, self.std = spec["mean"], spec["std"]
        self.augment = spec.get("augment") or {}
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.get("dtype") == "bfloat16")
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (b,) + shape, dtype=torch.uint8, generator=gen).to(dev)
        self.labels = torch.randint(0, nc, (b,), generator=gen).to(dev)

        self.student = models.get_model(spec["student"], nc, shape).to(dev)
        self.params = {"student": models.num_params(self.student), "teacher": 0}
        self.bn_stats = {"student": models.num_bn_stats(self.student), "teacher": 0}
        self.teacher, self.teacher_logits = None, None
        if spec.get("teacher") and self.kind == "train":
            teacher = models.get_model(spec["teacher"], nc, shape).to(dev).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.params["teacher"] = models.num_params(teacher)
            self.bn_stats["teacher"] = models.num_bn_stats(teacher)
            if spec.get("cached_teacher"):  # the logits arrive with the batch: computed once here
                with torch.no_grad(), self.autocast:
                    self.teacher_logits = teacher(common.normalize(self.images, self.mean, self.std)).float()
            else:
                self.teacher = teacher
        if self.kind == "train":
            self.student.train()
            self.opt = common.make_optimizer(self.student, spec["optimizer"])
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, common.lr_factor(spec["schedule"]))
            loss = spec["loss"]
            self.ce_w, self.kd_w, self.temp = float(loss["ce_weight"]), float(loss["kd_weight"]), float(loss["temperature"])
        else:
            self.student.eval()
            self.mask = torch.ones((b,), device=dev)
        self.student_fn, self.teacher_fn = self.student, self.teacher
        if spec.get("compile"):
            self.student_fn = torch.compile(self.student)
            self.teacher_fn = torch.compile(self.teacher) if self.teacher is not None else None

    def __call__(self):
        if self.kind == "eval":
            with torch.inference_mode(), self.autocast:
                logits = self.student_fn(common.normalize(self.images, self.mean, self.std)).float()
                nll = F.cross_entropy(logits, self.labels, reduction="none")
                return ((logits.argmax(-1) == self.labels) * self.mask).sum(), self.mask.sum(), (nll * self.mask).sum()
        x = common.augment(self.images, int(self.augment.get("crop_padding", 0)), bool(self.augment.get("flip")))
        x = common.normalize(x, self.mean, self.std)
        with self.autocast:
            t_logits = self.teacher_logits
            if self.teacher_fn is not None:
                with torch.no_grad():
                    t_logits = self.teacher_fn(x)
            s_logits = self.student_fn(x)
        loss = common.kd_objective(s_logits, self.labels, t_logits, self.ce_w, self.kd_w, self.temp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss


def handle(request: dict, state: dict) -> dict:
    cmd = request.get("cmd")
    if cmd == "info":
        dev = torch.device(request.get("device", "cpu"))
        info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "device": str(dev),
                "mkldnn": torch.backends.mkldnn.is_available()}
        if dev.type == "cuda":
            info.update(device_name=torch.cuda.get_device_name(dev),
                        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
        return info
    if cmd == "setup":
        state.pop("step", None)
        t0 = time.perf_counter()
        step = Step(request)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(int(request.get("warmup", 2))):  # includes torch.compile's compilation
            step()
        _sync(step.device)
        state["step"] = step
        return {"params": step.params, "bn_stats": step.bn_stats, "setup_s": setup_s,
                "first_steps_s": time.perf_counter() - t0}
    if cmd == "run":
        step = state["step"]
        k = max(1, int(request.get("sync_every", 1)))
        times = []
        for _ in range(max(1, int(request["steps"]) // k)):
            t0 = time.perf_counter()
            for _ in range(k):
                step()
            _sync(step.device)
            times.append(time.perf_counter() - t0)
        return {"times": times}
    raise ValueError(f"unknown request {cmd!r}")


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else written to stdout (Python or C) lands on stderr
    sys.stdout = sys.stderr
    state: dict = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("cmd") == "quit":
            protocol.write(json.dumps({"ok": True}) + "\n")
            break
        try:
            answer = {"ok": True, **handle(request, state)}
        except Exception as e:  # noqa: BLE001 - reported to the client, which decides
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()

"""Parameter and BatchNorm-statistic counts of the PyTorch reference models against kdjax's.

    python experiments/torch_reference/check_params.py --torch-python /path/to/python-with-torch

Run it with kdjax's Python: it counts kdjax's models (`kdjax.models.num_params` on abstract
variables, no compute) and asks `--torch-python` to count models.py's (`--torch-side` prints those
as JSON). Besides the totals it compares the multiset of parameter shapes (each shape's dimensions
sorted, since PyTorch stores OIHW / (out, in) where Flax stores HWIO / (in, out)): one tensor per
layer, layer for layer. Exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# (model, classes, image shape): the models the benchmark and the Fashion-MNIST recipe use.
MODELS = [("resnet18", 10, (32, 32, 3)), ("mobilenetv2", 10, (32, 32, 3)), ("resnet32x4", 100, (32, 32, 3)),
          ("resnet8x4", 100, (32, 32, 3)), ("cnn_small", 10, (28, 28, 1)), ("cnn_tiny", 10, (28, 28, 1)),
          ("mlp", 10, (28, 28, 1)), ("resnet20", 100, (32, 32, 3)), ("resnet34", 10, (32, 32, 3))]


def torch_counts() -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import models

    out = {}
    for name, nc, shape in MODELS:
        m = models.get_model(name, nc, shape)
        shapes = sorted(sorted(p.shape) for p in m.parameters())
        out[name] = [models.num_params(m), models.num_bn_stats(m), shapes]
    return out


def kdjax_counts() -> dict:
    import jax

    from kdjax import models

    out = {}
    for name, nc, shape in MODELS:
        v = models.param_shapes(models.get_model(name, nc), shape)
        shapes = sorted(sorted(x.shape) for x in jax.tree.leaves(v["params"]))
        out[name] = [models.num_params(v["params"]), models.num_params(v.get("batch_stats", {})), shapes]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch-python", default=sys.executable)
    p.add_argument("--torch-side", action="store_true", help="print the PyTorch counts as JSON and exit")
    a = p.parse_args()
    if a.torch_side:
        print(json.dumps(torch_counts()))
        return
    theirs = json.loads(subprocess.run([a.torch_python, os.path.abspath(__file__), "--torch-side"], check=True,
                                       capture_output=True, text=True).stdout)
    ours = kdjax_counts()
    bad = 0
    print(f"{'model':12s} {'kdjax params':>13s} {'torch params':>13s} {'kdjax BN stats':>15s} {'torch BN stats':>15s}  shapes")
    for name, _, _ in MODELS:
        (kp, kb, ks), (tp, tb, ts) = ours[name], theirs[name]
        ok = kp == tp and kb == tb and [list(x) for x in ks] == [list(x) for x in ts]
        bad += not ok
        print(f"{name:12s} {kp:13,d} {tp:13,d} {kb:15,d} {tb:15,d}  {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

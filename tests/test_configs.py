"""Every shipped config loads, validates for every method, and traces (abstractly) end to end."""

import glob
import importlib
import os
import re

import numpy as np
import pytest

from kdjax import config as kconfig
from kdjax import data as kdata
from kdjax import distill, train
from kdjax import step as kstep

CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def fake_dataset(name, num_classes, shape):
    split = kdata.Split(np.zeros((128,) + shape, np.uint8), (np.arange(128) % num_classes).astype(np.int32))
    return kdata.Dataset(name, split, None, split, num_classes, (0.5,) * shape[-1], (0.25,) * shape[-1])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_for_every_method(name):
    module = importlib.import_module(f"experiments.configs.{name}")
    assert "python -m experiments." in module.__doc__  # the docstring states the launch command
    # Distillation configs take every method; configs with modes instead (digits_transfer) every mode.
    args = [f"mode={m}" for m in module.MODES] if hasattr(module, "MODES") else [f"method={m}" for m in distill.METHODS]
    for arg in args:
        kconfig.validate(module.get_config(arg))
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("no_such_argument=1")


# The ViT pairs' transformer has tokens, not maps, to pair: their smoke runs are in tests/test_deit.py.
@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("cifar") and "vit" not in n and "deit" not in n])
def test_cifar_pairs_trace_with_paired_feature_methods(name):
    """Traces teacher, student and the adapters of the methods that pair several feature maps."""
    module = importlib.import_module(f"experiments.configs.{name}")
    for method in ("vid", "reviewkd"):
        config = module.get_config(f"method={method}")
        ds = fake_dataset(config.dataset.name, 100 if config.dataset.name == "cifar100" else 10, (32, 32, 3))
        par = kstep.DataParallel("jit")
        teacher = train.Stage("teacher", config, ds, par, "unused").model
        train.Stage("student", config, ds, par, "unused").preflight([teacher])


def test_cifar_learning_rates_follow_the_optimizer():
    """The CIFAR recipe's rates come from optimizer.learning_rate (None: the optimizer's own default),
    times each stage's scale, so an explicit --config.optimizer.learning_rate or a changed
    optimizer reaches every stage (it used to lose, silently, to per-stage rates)."""
    module = importlib.import_module("experiments.configs.cifar10_resnet18_mobilenetv2")
    ds = fake_dataset("cifar10", 10, (32, 32, 3))
    par = kstep.DataParallel("jit")

    def rates(**optimizer):
        config = module.get_config()
        config.optimizer.update(optimizer)
        kconfig.validate(config)
        return tuple(train.Stage(role, config, ds, par, "unused").lr for role in ("teacher", "student", "student_scratch"))

    assert rates() == pytest.approx((0.05, 0.01, 0.01))  # RepDistiller: 0.05, MobileNetV2 students 0.01
    assert rates(learning_rate=0.1) == pytest.approx((0.1, 0.02, 0.02))
    assert rates(name="adam") == pytest.approx((1e-3, 2e-4, 2e-4))
    assert rates(name="adadelta") == pytest.approx((1.0, 0.2, 0.2))


def test_learning_rate_table_is_documented():
    """The default-rate table in kdjax/config.py's comment (the schema, beside
    optimizer.learning_rate) and in docs/configs.md are the one in kdjax.optim."""
    from experiments.configs import common
    from kdjax import config, optim

    assert common.DEFAULT_LEARNING_RATES is config.DEFAULT_LEARNING_RATES is optim.DEFAULT_LEARNING_RATES
    repo = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(repo, "kdjax", "config.py")) as f:
        schema_src = f.read()
    with open(os.path.join(repo, "docs", "configs.md")) as f:
        doc = f.read()
    for name, lr in optim.DEFAULT_LEARNING_RATES.items():
        assert re.search(rf"#   {name} +{lr!r} ", schema_src), name
        assert f"| `{name}` | {lr!r} |" in doc, name


def test_every_schema_field_has_a_comment():
    """kdjax/config.py's base() is the schema: every field it sets is commented, on its line or by
    the comment lines just above it (which cover the fields that follow, up to a blank line or a
    field with its own comment)."""
    import inspect

    from kdjax import config

    covered = False
    for line in inspect.getsource(config.base).splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            covered = bool(text)
            continue
        if not re.match(r"(c|m)(\.\w+)+ = ", text) or text.endswith("ConfigDict()"):
            continue  # code, or a group of fields
        assert covered or "  # " in text, f"schema field without a comment: {text}"
        covered = covered and "  # " not in text  # a field's own comment ends the run above it


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("compress")])
def test_compress_plans_validate(name):
    """Every row and trained variant of a compression plan is a valid run (no training here;
    tests/test_compress.py runs the digits plan end to end)."""
    from kdjax import compress

    module = importlib.import_module(f"experiments.configs.{name}")
    for arg in ("", "smoke") if name.startswith("compress_cifar") else ("", "method=at"):
        config = module.get_config(arg)
        assert [r[0] for r in compress.plan(config)][:2] == ["teacher", "student"]
        for variant in config.compress.variants:
            kconfig.validate(compress.variant_config(config, variant, "/nonexistent/run"))


def test_transfer_demo_on_fashion_mnist_validates():
    module = importlib.import_module("experiments.configs.digits_transfer")
    for mode in module.MODES:
        config = module.get_config(f"mode={mode},data=fashion_mnist")
        kconfig.validate(config)
        assert config.dataset.name == "fashion_mnist"
    with pytest.raises(ValueError, match="unknown data 'svhn'"):
        module.get_config("data=svhn")

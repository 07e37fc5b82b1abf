"""Every shipped config loads, validates for every method, and traces (abstractly) end to end."""

import glob
import importlib
import os

import numpy as np
import pytest

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
    for method in distill.METHODS:
        train.validate(module.get_config(f"method={method}"))
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("no_such_argument=1")


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("cifar")])
def test_cifar_pairs_trace_with_paired_feature_methods(name):
    """Traces teacher, student and the adapters of the methods that pair several feature maps."""
    module = importlib.import_module(f"experiments.configs.{name}")
    for method in ("vid", "reviewkd"):
        config = module.get_config(f"method={method}")
        ds = fake_dataset(config.dataset.name, 100 if config.dataset.name == "cifar100" else 10, (32, 32, 3))
        par = kstep.DataParallel("jit")
        teacher = train.Stage("teacher", config, ds, par, "unused").model
        train.Stage("student", config, ds, par, "unused").preflight([teacher])

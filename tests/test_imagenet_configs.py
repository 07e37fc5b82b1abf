"""The ImageNet pair configs' `:smoke` runs (issue 23): each config's real models at the real
resolution (224), its teacher imported from a torchvision / timm state dict (random weights with 3
classes, built here with torch: the hubs cannot be reached) and used as it is, a few distillation
steps on a tiny generated image folder streamed through Grain, end to end."""

import importlib
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from experiments.configs import common  # noqa: E402

# config -> (its teacher as a torch module with 3 classes, the arch kdjax infers from its keys)
TEACHERS = {
    "imagenet_resnet34_resnet18": (lambda: torchvision.models.resnet34(num_classes=3), "torchvision/resnet34"),
    "imagenet_resnet50_mobilenetv2": (lambda: torchvision.models.resnet50(num_classes=3), "torchvision/resnet50"),
    "imagenet_resnet50_deit": (lambda: torchvision.models.resnet50(num_classes=3), "torchvision/resnet50"),
    "imagenet_function_matching": (lambda: timm.create_model("vit_base_patch16_224", num_classes=3),
                                   "timm/vit_base_patch16_224"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return common.smoke_folder(str(tmp_path_factory.mktemp("imagenet_smoke")))


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_imagenet_pair_smoke_runs_from_imported_teacher_weights(name, folder, tmp_path):
    from kdjax import train

    build, arch = TEACHERS[name]
    torch.manual_seed(0)
    weights = str(tmp_path / "teacher.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in build().eval().state_dict().items()}, weights)
    config = importlib.import_module(f"experiments.configs.{name}").get_config(f"smoke,data_dir={folder},teacher_weights={weights}")
    assert config.dataset.image_size == 224 and config.teacher.epochs == 0
    workdir = str(tmp_path / "run")
    summary = train.run(config, workdir)

    assert summary["teacher"]["weights_arch"] == arch
    assert not os.path.exists(os.path.join(workdir, "teacher"))  # the imported teacher is used as it is
    student = summary["student"]
    assert student["steps"] == 3 and 0.0 <= student["test_accuracy"] <= 1.0
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["dataset"]["normalize"] == ("inception" if "vit" in arch else "imagenet")
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    losses = [r["loss"] for r in history if r.get("role") == "student" and "loss" in r]
    assert losses and np.all(np.isfinite(losses))

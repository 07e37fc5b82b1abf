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


def test_folder_finetune_fine_tunes_the_head_of_imported_weights_then_distils(folder, tmp_path):
    """experiments/configs/folder_finetune.py (issue 23 part 4): a 1000-class torchvision ResNet-18
    (its model read from the file) fine-tuned on a 3-class folder with `freeze` (a new 3-class head;
    the backbone, BatchNorm statistics included, still the imported weights after training), then a
    student distilled from it and the same student from scratch, all on the folder."""
    from kdjax import optim, train
    from kdjax.models import pretrained
    from tests.test_train import final_params

    torch.manual_seed(0)
    weights = str(tmp_path / "resnet18.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().eval().state_dict().items()},
                                weights)
    config = importlib.import_module("experiments.configs.folder_finetune").get_config(
        f"smoke,data_dir={folder},teacher_weights={weights},freeze,image_size=64,student=cnn_small")
    assert config.teacher.model == "resnet18_imagenet"
    workdir = str(tmp_path / "run")
    summary = train.run(config, workdir)

    assert set(summary) == {"teacher", "student", "student_scratch"}
    assert summary["teacher"]["weights_arch"] == "torchvision/resnet18" and summary["teacher"]["epochs"] == 1
    _, params = final_params(workdir, "teacher")
    _, imported = pretrained.load(weights)
    tuned = optim.flat_paths({"params": params["student"]})  # the teacher stage trains its model as 'student'
    source = optim.flat_paths({"params": imported["params"]})
    assert tuned["params/fc/kernel"].shape == (512, 3)
    for path, value in tuned.items():
        if not path.startswith("params/fc/"):
            np.testing.assert_array_equal(value, source[path], err_msg=path)
    for role in ("student", "student_scratch"):
        assert summary[role]["steps"] == 3 and 0.0 <= summary[role]["test_accuracy"] <= 1.0

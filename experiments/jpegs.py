"""Generated ImageNet-like JPEG folders for the benchmarks (experiments.bench --input_pipeline,
experiments.bench_fkd); no flags, so any script can import it."""

import os

import numpy as np


def generate_jpegs(root: str, count: int, classes: int = 4, seed: int = 0) -> str:
    """`count` ImageNet-like JPEGs (about 500 x 375, quality 90, smooth content plus noise, roughly
    ImageNet's file sizes) in `classes` class folders under root/train; reused when present."""
    from PIL import Image

    train = os.path.join(root, "train")
    done = os.path.join(root, f".done-{count}")
    if os.path.exists(done):
        return train
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(train, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        w, h = int(rng.integers(400, 501)), int(rng.integers(333, 376))
        coarse = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.int16) + rng.integers(-20, 21, (h, w, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    open(done, "w").close()
    return train

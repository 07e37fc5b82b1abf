"""PyTorch's input pipeline for experiments.bench's input cases: torchvision ImageFolder + DataLoader
with the transforms of kdjax's streamed loader (PIL decode, RandomResizedCrop(size) bilinear,
RandomHorizontalFlip, uint8 tensors: normalisation is on the device in both), shuffled, batched.

    python imagefolder_loader.py ROOT WORKERS BATCH BATCHES SIZE SEED

Prints one JSON line: seconds to the first batch (workers' start included) and images/s over the
next BATCHES batches. Needs torch and torchvision (not kdjax's dependencies)."""

import json
import sys
import time

import torch
import torchvision
from torchvision import datasets, transforms


def main(root, workers, batch, batches, size, seed):
    torch.manual_seed(seed)
    transform = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                    transforms.PILToTensor()])
    data = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
    seconds = time.perf_counter() - start
    assert images.dtype == torch.uint8 and tuple(images.shape) == (batch, 3, size, size)
    del it
    print(json.dumps({"first_batch_s": first, "images_per_sec": batch * batches / seconds,
                      "torch": torch.__version__, "torchvision": torchvision.__version__,
                      "intra_op_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:7]))

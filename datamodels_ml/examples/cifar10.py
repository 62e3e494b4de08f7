"""The GPU example: CIFAR-10 with a ResNet-9-style network, data read through FFCV.

Data preparation (once; needs torchvision for the download, which this project does not install):

    pip install torchvision
    python -m datamodels_ml.examples.cifar10 prepare --out data/cifar10

writes ``data/cifar10/train.beton`` (50,000 images) and ``data/cifar10/test.beton`` (10,000).
Then, on a machine with 8 GPUs:

    make train SPEC=configs/cifar10_spec.json MAIN=datamodels_ml.examples.cifar10 STORE=data/cifar10/store N=50000 GPUS=8

Model ``index`` draws a mask with alpha = 0.5 (seeded by the index), trains on the masked training
images for ``epochs`` epochs (SGD, a triangular learning rate, label smoothing, flip and
translate augmentation, bf16 autocast on GPU) and returns ``masks`` (bool [50000]) and
``margins`` (float16 [10000]) on the test set. Not run in CI (no GPU there); a CPU smoke test on
tiny synthetic images checks the pipeline.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

MEAN = np.array([125.307, 122.961, 113.8575])
STD = np.array([51.5865, 50.847, 51.255])


def write_betons(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 out: str | Path) -> None:
    """Write uint8 images [N, 32, 32, 3] and integer labels to ``out/{train,test}.beton``."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        items = [(x[i], int(y[i])) for i in range(len(x))]
        writer = DatasetWriter(str(out / f"{name}.beton"), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                               num_workers=1)
        writer.from_indexed_dataset(items)


def prepare(out: str | Path) -> None:
    """Download CIFAR-10 with torchvision and write the two FFCV files."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        raise SystemExit("error: the data-preparation step needs torchvision: pip install torchvision") from None
    raw = Path(out) / "raw"
    train, test = CIFAR10(str(raw), train=True, download=True), CIFAR10(str(raw), train=False, download=True)
    write_betons(train.data, np.array(train.targets), test.data, np.array(test.targets), out)


def _loader(path: Path, *, batch_size: int, indices, train: bool, device: str, seed: int):
    import torch
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Convert, RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

    image = [SimpleRGBImageDecoder()]
    if train:
        image += [RandomHorizontalFlip(), RandomTranslate(padding=2)]
    image += [ToTensor(), ToDevice(torch.device(device), non_blocking=True), ToTorchImage(), Convert(torch.float32)]
    label = [IntDecoder(), ToTensor(), ToDevice(torch.device(device)), Squeeze()]
    return Loader(str(path), batch_size=batch_size, num_workers=min(8, os.cpu_count() or 1), indices=indices, seed=seed,
                  order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, drop_last=False,
                  pipelines={"image": image, "label": label})


def resnet9(num_classes: int = 10):
    """A small residual network in the style used for fast CIFAR-10 training."""
    import torch.nn as nn

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    class Residual(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return x + self.inner(x)

    return nn.Sequential(
        block(3, 64), block(64, 128), nn.MaxPool2d(2),
        Residual(nn.Sequential(block(128, 128), block(128, 128))),
        block(128, 256), nn.MaxPool2d(2),
        block(256, 512), nn.MaxPool2d(2),
        Residual(nn.Sequential(block(512, 512), block(512, 512))),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes, bias=False),
    )


def main(*, index: int, logdir: str, data_dir: str = "data/cifar10", alpha: float = 0.5, epochs: int = 24,
         batch_size: int = 512, lr: float = 0.5, weight_decay: float = 5e-4, label_smoothing: float = 0.1,
         num_train: int = 50_000) -> dict[str, np.ndarray]:
    import torch

    from datamodels_ml.examples.digits import margins_of

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = Path(data_dir)
    mask = np.random.default_rng(index).random(num_train) < alpha
    torch.manual_seed(index)
    train = _loader(data / "train.beton", batch_size=batch_size, indices=np.flatnonzero(mask), train=True,
                    device=device, seed=index)
    test = _loader(data / "test.beton", batch_size=1024, indices=None, train=False, device=device, seed=0)
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    model = resnet9().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps = epochs * len(train)
    peak = max(1, int(0.2 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / peak if s < peak else max(0.0, (steps - s) / max(1, steps - peak)))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            with amp:
                loss = loss_fn(model((images - mean) / std), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    margins, correct = [], 0
    with torch.no_grad(), amp:
        for images, labels in test:
            logits = model((images - mean) / std).float()
            margins.append(margins_of(logits, labels))
            correct += int((logits.argmax(1) == labels).sum())
    margins_np = torch.cat(margins).cpu().numpy().astype(np.float16)
    return {"masks": mask, "margins": margins_np, "accuracy": np.float32(correct / len(margins_np))}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CIFAR-10 example: data preparation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download CIFAR-10 (torchvision) and write FFCV files")
    p.add_argument("--out", default="data/cifar10")
    opts = parser.parse_args()
    prepare(opts.out)
    print(f"wrote {opts.out}/train.beton and {opts.out}/test.beton")

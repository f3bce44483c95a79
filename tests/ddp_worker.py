"""A training run for test_scaling's data-parallel tests: ``python tests/ddp_worker.py MODE OUT``
in one process, or under ``torchrun --nproc-per-node 2``; rank 0 saves the trained weights to OUT.

MODE: ``hard`` (cross-entropy with DSA), ``soft`` (the soft protocol on relabel records), each with
an instance-norm ConvNet; ``hard-bn`` / ``hard-bn-sync``: a BatchNorm ConvNet without / with
``sync_bn``. Not a test module itself (no ``test_`` prefix)."""

import sys

import torch
from safetensors.torch import save_file

from ddkit import distributed
from ddkit.augment import DSA
from ddkit.data import load_dataset
from ddkit.evaluate import resolve_config
from ddkit.evaluate.soft import SoftProtocol, train_soft
from ddkit.methods.relabel import relabel
from ddkit.models import create
from ddkit.models.training import train_classifier
from ddkit.store import DistilledSet
from ddkit.utils import make_generator, normalize, seeded_global_rng


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    world = distributed.setup("cpu")
    real = load_dataset("digits")
    images = real.train.images[:60].float().div(255.0)  # 60 images: batches of 25 leave a short last one
    labels = real.train.labels[:60].long()
    norm = "batch" if mode.startswith("hard-bn") else "instance"
    with seeded_global_rng(0):
        model = create("convnet", in_channels=1, num_classes=10, image_size=8, width=8, norm=norm)
    if mode.startswith("hard"):
        config = {"epochs": 4, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 25, "decay_at": 0.5,
                  "decay_factor": 0.1, "reset_momentum": True, "sync_bn": mode == "hard-bn-sync"}
        train_classifier(model, normalize(images, real.mean, real.std), labels, config, make_generator(1),
                         dsa=DSA("color_crop_cutout_flip_scale_rotate"))
    else:
        distilled = DistilledSet(images=images, labels=labels, class_names=list(real.class_names), dataset="digits",
                                 mean=real.mean, std=real.std, method="random")
        with seeded_global_rng(5):
            teacher = create("convnet", in_channels=1, num_classes=10, image_size=8, width=8, norm="instance")
        relabelled = relabel(distilled, [teacher], epochs=2, seed=0, show_progress=False)
        config = resolve_config("soft", "smoke", ["epochs=3", "batch_size=25"])
        protocol = SoftProtocol(relabelled, config)
        source, train_labels = protocol.source("cpu")
        train_soft(model, source, train_labels, protocol.config, make_generator(1))
    if world.is_main:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

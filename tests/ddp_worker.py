"""A training run for test_scaling's data-parallel tests: ``python tests/ddp_worker.py MODE OUT``
in one process, or under ``torchrun --nproc-per-node 2``; rank 0 saves the trained weights to OUT.

MODE: ``hard`` (cross-entropy with DSA), ``soft`` (the soft protocol on relabel records), each with
an instance-norm ConvNet; ``hard-bn`` / ``hard-bn-sync``: a BatchNorm ConvNet without / with
``sync_bn``; ``hard-bn-checkpointed``: ``hard-bn`` with an epoch checkpoint after every epoch in
``OUT.ckpt`` (with ``STOP_AFTER_SAVES=N`` every rank exits with status 3 after the N-th epoch's
checkpoint), ``hard-bn-own-checkpoints``: the same, but each rank looks for ``OUT.ckpt<rank>``, as
if the ranks did not share a file system. Not a test module itself (no ``test_`` prefix)."""

import os
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
from ddkit.models.training import RunCheckpoint, train_classifier
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
                         dsa=DSA("color_crop_cutout_flip_scale_rotate"), checkpoint=_checkpoint(mode, out, world))
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


class StoppingCheckpoint(RunCheckpoint):
    """A checkpoint after every epoch; every rank exits after the ``stop_after``-th (0: never)."""

    def __init__(self, path, stop_after: int):
        super().__init__(path, {"run": "ddp worker"}, every_seconds=0.0)
        self.stop_after, self.calls = stop_after, 0

    def restore(self, *args, **kwargs):
        resumed = super().restore(*args, **kwargs)
        if resumed is not None:
            print(f"rank {distributed.current().rank} resumed at epoch {resumed[1]['next_epoch']}", file=sys.stderr)
        return resumed

    def maybe_save(self, *args, **kwargs):
        wrote = super().maybe_save(*args, **kwargs)
        self.calls += 1
        if self.calls == self.stop_after:
            distributed.barrier()  # rank 0 has written it
            os._exit(3)
        return wrote


def _checkpoint(mode: str, out: str, world):
    if mode == "hard-bn-checkpointed":
        return StoppingCheckpoint(out + ".ckpt", int(os.environ.get("STOP_AFTER_SAVES", "0")))
    if mode == "hard-bn-own-checkpoints":
        return StoppingCheckpoint(f"{out}.ckpt{world.rank}", 0)
    return None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

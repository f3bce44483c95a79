"""End to end on real JPEG files in the ImageNet layout (Fashion-MNIST, 10 wnid folders, a val label
file): squeeze on the streamed folder -> recover -> relabel (sharded) -> soft evaluation, then the
same set judged with an online teacher, and an outside teacher of another class order refused."""

import json
import shutil

import pytest
import torch

import ddkit
from ddkit.cli import main
from imagenet_folder import TEACHER_ARCH, WNIDS, build_imagenet_folder, one_thread, train_tiny_teacher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_imagenet_folder(tmp_path_factory.mktemp("e2e") / "imagenet", per_class=6, val_per_class=2)


def _run(capsys, *words):
    with one_thread():
        code = main([str(w) for w in words])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_squeeze_recover_relabel_sharded_then_soft_and_online_evaluation(folder, tmp_path, isolated_data, capsys):
    dataset = f"imagenet:{folder}"
    # the smoke tier's teacher, trained longer so that it passes the class-order check as an online teacher
    out = _run(capsys, "distill", "sre2l", "--dataset", dataset, "--image-size", 32, "--ipc", 1, "--preset", "smoke",
               "--set", "squeeze.epochs=30", "--out", tmp_path / "set", "-q")
    assert "sre2l: 1 images per class" in out
    distilled = ddkit.load(tmp_path / "set")
    assert distilled.images.shape == (10, 3, 32, 32) and distilled.labels.tolist() == list(range(10))
    relabel = distilled.meta["relabel"]
    assert relabel["epochs"] == 20 and [s["epochs"] for s in relabel["shards"]] == [[0, 10], [10, 20]]
    assert len(list((tmp_path / "set" / "relabel-records").iterdir())) == 2
    teacher = distilled.meta["teachers"][0]
    assert teacher["model"]["arch"] == "convnet" and teacher["test_accuracy"] is not None

    out = _run(capsys, "eval", tmp_path / "set", "--protocol", "soft", "--preset", "smoke", "--runs", 1,
               "--set", "epochs=3", "-q")
    assert "imagenet_resnet18" in out and "sre2l-imagenet" in out
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    accuracy = manifest["evaluations"][-1]["accuracies"][0]
    assert 0.0 <= accuracy <= 100.0 and manifest["evaluations"][-1]["config"]["targets"] == "records"

    folders = list((isolated_data / "teachers").rglob("manifest.json"))
    assert len(folders) == 1
    out = _run(capsys, "eval", tmp_path / "set", "--protocol", "soft", "--preset", "smoke", "--runs", 1,
               "--set", "epochs=3", "--online-teacher", folders[0].parent, "-q")
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["evaluations"][-1]["config"]["targets"] == "online"


def test_an_outside_teacher_of_another_class_order_is_refused(folder, tmp_path, isolated_data, capsys):
    weights = train_tiny_teacher(folder, tmp_path / "teacher.safetensors")
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    for k, wnid in enumerate(WNIDS):  # class k's images now under the name of class k+1
        (renamed / "train" / wnid).rename(renamed / "train" / f"tmp{k}")
    for k in range(len(WNIDS)):
        (renamed / "train" / f"tmp{k}").rename(renamed / "train" / WNIDS[(k + 1) % len(WNIDS)])
    words = ["distill", "cda", "--dataset", f"imagenet:{renamed}", "--image-size", "32", "--ipc", "1", "--preset",
             "smoke", "--teacher", f"{TEACHER_ARCH}:{weights}", "--out", str(tmp_path / "refused"), "-q"]
    assert main(words) == 2
    err = capsys.readouterr().err.strip()
    assert "another order" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "refused" / "manifest.json").exists()


def test_two_processes_on_the_streamed_folder_give_the_one_process_set(folder, tmp_path, isolated_data, capsys):
    # squeeze with DDP on streamed batches, recover and relabel (sharded) split across ranks, then the
    # evaluation's students with DDP: the same set and records as one process
    options = ["distill", "sre2l", "--dataset", f"imagenet:{folder}", "--image-size", 32, "--ipc", 1, "--preset",
               "smoke", "--set", "relabel.epochs=2", "--set", "relabel.shard_epochs=1", "-q"]
    _run(capsys, *options, "--out", tmp_path / "two", "--nproc", 2)  # its ranks train the teacher (DDP, streamed)
    assert len(list((isolated_data / "teachers").rglob("manifest.json"))) == 1
    _run(capsys, *options, "--out", tmp_path / "one")  # loads that teacher from the cache
    one, two = ddkit.load(tmp_path / "one"), ddkit.load(tmp_path / "two")
    assert torch.equal(one.images, two.images) and two.meta["processes"] == 2
    assert one.meta["relabel"]["shards"] == two.meta["relabel"]["shards"]  # same bytes (sha256), both shards
    _run(capsys, "eval", tmp_path / "two", "--preset", "smoke", "--runs", 1, "--set", "epochs=2", "--nproc", 2)
    record = ddkit.load(tmp_path / "two").meta["evaluations"][-1]
    assert record["protocol"] == "hard" and len(record["accuracies"]) == 1

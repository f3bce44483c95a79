"""Streaming datasets: ImageNet-layout folders read from disk per sample (ddkit.data.streaming)."""

import random
import weakref

import pytest
import torch
from PIL import Image

from ddkit.data import dataset_info, load_dataset
from ddkit.data import streaming
from ddkit.errors import DDKitError
from imagenet_folder import WNIDS, build_imagenet_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_imagenet_folder(tmp_path_factory.mktemp("inet") / "imagenet", per_class=6, val_per_class=2)


def test_layout_classes_and_val_labels_from_the_label_file(folder):
    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    assert ds.streaming and ds.class_names == sorted(WNIDS) and ds.num_classes == 10
    assert len(ds.train) == 60 and len(ds.test) == 20 and ds.image_shape == (3, 32, 32)
    # val file ILSVRC2012_val_{k*2+i+1} belongs to class k (the builder's label file says so)
    for path, label in zip(ds.test.files, ds.test.labels.tolist()):
        number = int(path.rsplit("_", 1)[1].split(".")[0])
        assert label == (number - 1) // 2
    assert [int(t.numel()) for t in ds.class_indices("train")] == [6] * 10
    info = dataset_info(f"imagenet:{folder}")
    assert info["image_shape"] == (3, 224, 224) and info["train"] == 60 and info["test"] == 20


def test_val_class_folders_and_stream_prefix(tmp_path):
    for split in ("train", "val"):
        for k, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            d = tmp_path / split / f"c{k}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 24), colour).save(d / f"{i}.png")
    ds = load_dataset(f"stream:{tmp_path}")
    assert ds.image_shape == (3, 20, 20) and ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    red = ds.train.images[0]
    assert red[0].float().mean() > 250 and red[2].float().mean() < 5


def test_eval_transform_resizes_the_short_side_then_centre_crops(tmp_path):
    # 64 wide x 96 high: the top 20 rows red, the rest blue. ImageNet rule at 56 px: short side
    # round(56 * 256 / 224) = 64 (unchanged), centre crop 56 from (64, 96): rows 20..75 -> all blue
    image = Image.new("RGB", (64, 96), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 64, 20))
    out = streaming.to_tensor(streaming.eval_transform(image, 56, 256 / 224), 3)
    assert out.shape == (3, 56, 56)
    assert int(out[0].max()) == 0 and int(out[2].min()) == 255
    # one row more of red reaches the crop
    image.paste((255, 0, 0), (0, 0, 64, 21))
    out = streaming.to_tensor(streaming.eval_transform(image, 56, 256 / 224), 3)
    assert int(out[0, 0].min()) == 255 and int(out[0, 1:].max()) == 0


def test_random_resized_box_stays_inside_and_draws_the_published_area_range():
    rng = random.Random(0)
    fractions = []
    for _ in range(2000):
        left, top, w, h = streaming.random_resized_box(100, 80, rng)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 80 and w > 0 and h > 0
        fractions.append(w * h / 8000)
    assert min(fractions) >= 0.08 * 0.9 and max(fractions) <= 1.0
    assert 0.45 < sum(fractions) / len(fractions) < 0.6  # uniform area 0.08..1 (mean 0.54), rounding aside


def test_training_crops_are_the_same_whichever_worker_decodes_them(folder):
    ds = load_dataset(f"imagenet:{folder}", image_size=24)
    single = [b for b in ds.train.loader(16, augment=True, shuffle=True, workers=0, seed=3, epoch=1)]
    pooled = [b for b in ds.train.loader(16, augment=True, shuffle=True, workers=2, seed=3, epoch=1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, pooled))
    other = next(iter(ds.train.loader(16, augment=True, shuffle=True, workers=0, seed=3, epoch=2)))
    assert not torch.equal(single[0][0], other[0])


def test_a_streaming_pass_holds_at_most_one_batch_of_decoded_images(folder, monkeypatch):
    """Every decoded sample is counted while it is alive: a training pass and an evaluation pass over
    60 images in batches of 4 never hold more than one batch's samples (the folder decodes to 15x that)."""
    alive, peak = set(), [0]
    real_to_tensor = streaming.to_tensor

    def counted(image, channels):
        tensor = real_to_tensor(image, channels)
        key = id(tensor)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, key)
        return tensor

    monkeypatch.setattr(streaming, "to_tensor", counted)
    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    seen = 0
    for images, labels in ds.train.loader(4, augment=True, shuffle=True, workers=0):
        seen += images.shape[0]
    assert seen == 60 and 1 <= peak[0] <= 4
    # a streamed evaluation (the evaluator's test pass) holds one batch too
    from ddkit.models.training import test_accuracy

    peak[0] = 0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    test_accuracy(net, streaming.normalized_split(ds, "train", "cpu"), ds.train.labels, batch_size=4)
    assert 1 <= peak[0] <= 4


def test_per_class_sampling_decodes_only_the_chosen_images(folder, monkeypatch):
    from ddkit.evaluate import random_subset

    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    opened = []
    real_open = streaming.open_image
    monkeypatch.setattr(streaming, "open_image", lambda path, channels: opened.append(path) or real_open(path, channels))
    subset = random_subset(ds, 2, seed=0)
    assert subset.images.shape == (20, 3, 32, 32) and len(opened) == 20
    index = subset.meta["source_indices"]
    assert torch.equal(subset.images[0], ds.train.images[index[0]].float() / 255)


def test_the_matching_family_decodes_only_the_real_images_each_iteration_draws(folder, monkeypatch, isolated_data):
    import ddkit
    from ddkit.methods.matching import RealSampler
    from ddkit.utils import make_generator, normalize

    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    sampler = RealSampler(ds, "cpu", make_generator(5))
    drawn = sampler.per_class(2)
    generator = make_generator(5)  # the sampler's draws, repeated
    picks = [torch.randperm(idx.numel(), generator=generator)[:2] for idx in ds.class_indices("train")]
    index = torch.cat([idx[pick] for idx, pick in zip(ds.class_indices("train"), picks)])
    assert torch.equal(drawn, normalize(ds.train.images[index].float() / 255, ds.mean, ds.std))
    opened = []
    real_open = streaming.open_image
    monkeypatch.setattr(streaming, "open_image", lambda path, channels: opened.append(path) or real_open(path, channels))
    for method in ("dm", "idm", "iid", "ddm"):  # IID's extractor trains on its (smoke: 200-image) subset
        opened.clear()
        made = ddkit.distill(method, dataset=f"imagenet:{folder}", ipc=1, preset="smoke", show_progress=False,
                             image_size=32, overrides={"iterations": 2})
        assert made.images.shape == (10, 3, 32, 32) and torch.isfinite(made.images).all()
        assert 0 < len(opened) < 10 * len(ds.train.labels)  # batches of drawn images, never the split each step


def test_streamed_test_accuracy_equals_the_in_memory_one(folder):
    from ddkit.models.training import test_accuracy

    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    streamed = test_accuracy(net, streaming.normalized_split(ds, "test", "cpu"), ds.test.labels, batch_size=7)
    whole = torch.stack([ds.test.images[i] for i in range(len(ds.test))]).float().div(255)
    whole = (whole - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    assert streamed == pytest.approx(test_accuracy(net, whole, ds.test.labels))


def test_whole_split_conversion_and_bad_layouts_are_one_line_errors(folder, tmp_path):
    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    with pytest.raises(DDKitError, match="streams its images from disk"):
        ds.train.images.float()
    (tmp_path / "train" / "n1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n1" / "a.JPEG")
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "v.JPEG")
    with pytest.raises(DDKitError, match="no labelled val/") as err:
        load_dataset(f"imagenet:{tmp_path}")
    assert "\n" not in str(err.value)
    (tmp_path / "val" / "val_labels.txt").write_text("v.JPEG 17\n")
    with pytest.raises(DDKitError, match="ILSVRC2012 ids"):
        load_dataset(f"imagenet:{tmp_path}")
    with pytest.raises(DDKitError, match="needs a path"):
        load_dataset("imagenet:")


def test_gvbsm_conv_targets_stream_random_resized_crops_of_the_files(folder, tmp_path):
    from types import SimpleNamespace

    from ddkit.methods.recover import conv_modules, real_conv_targets
    from ddkit.methods.squeeze import build_net
    from ddkit.methods.stats_family import resolve_preset

    ds = load_dataset(f"imagenet:{folder}", image_size=32)
    config = resolve_preset("gvbsm", ds.name, 10, "smoke", real=ds)["recover"]
    assert config["crop"] == "resized" and config["patch_size"] == 16
    net = build_net({"arch": "convnet", "width": 8, "depth": 2}, ds, seed=0, device="cpu").eval()
    teacher = SimpleNamespace(model=net, path=tmp_path)
    first = real_conv_targets(teacher, ds, dict(config, conv_target_batch=16), "cpu")
    assert len(first) == len(conv_modules(net)) and all(torch.isfinite(t.mean).all() for t in first)
    again = real_conv_targets(teacher, ds, dict(config, conv_target_batch=16), "cpu")  # from its cache
    assert all(torch.equal(a.mean, b.mean) for a, b in zip(first, again))

"""ImageNet-layout networks with torchvision's keys, external teachers and the class-order check."""

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ddkit.data import load_dataset
from ddkit.errors import DDKitError
from ddkit.methods import pretrained
from ddkit.models import count_parameters, create
from ddkit.models.imagenet import TORCHVISION_NAMES
from imagenet_folder import TEACHER_ARCH, one_thread, WNIDS, build_imagenet_folder, train_tiny_teacher

SYSTEM_PYTHON = "/usr/bin/python3"
#: parameter counts at 1000 classes, as torchvision's model documentation lists them
PUBLISHED_PARAMETERS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
                        "shufflenet_v2_x0_5": 1_366_792, "shufflenet_v2_x1_0": 2_278_604, "efficientnet_b0": 5_288_548}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_counts_are_torchvisions(name):
    arch, options = TORCHVISION_NAMES[name]
    assert count_parameters(create(arch, 3, 1000, 224, **options)) == PUBLISHED_PARAMETERS[name]


def test_imagenet_networks_take_any_size_and_give_embeddings_and_taps():
    with one_thread():
        _any_size()


def _any_size():
    for arch, options in {v for v in ((a, tuple(o.items())) for a, o in TORCHVISION_NAMES.values())}:
        net = create(arch, 3, 7, 64, **dict(options)).eval()
        x = torch.randn(2, 3, 32, 40)
        taps = net.forward_taps(x, net.tap_names)
        assert taps["logits"].shape == (2, 7) and taps["embedding"].shape == (2, net.embedding_dim)
        assert torch.allclose(net.classifier(taps["embedding"]), taps["logits"], atol=1e-6)


def _torchvision_weights(tmp_path: Path) -> Path:
    """Run torchvision in the system Python: each network at a fixed seed, its state dict, an input
    and its logits saved as a .pt of tensors. Skips where that Python has no torchvision."""
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import torchvision"], capture_output=True, text=True) \
        if Path(SYSTEM_PYTHON).is_file() else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot import torchvision (Debian: apt-get install python3-torchvision); "
                    f"the key and logit comparison needs the real torchvision")
    script = textwrap.dedent(f"""
        import torch, torchvision
        for name in {sorted(PUBLISHED_PARAMETERS)!r}:
            torch.manual_seed(0)
            net = getattr(torchvision.models, name)(num_classes=10).eval()
            x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                y = net(x)
            state = {{k: v.clone() for k, v in net.state_dict().items()}}
            torch.save({{"state": state, "x": x, "y": y}}, "{tmp_path}/" + name + ".pt")
    """)
    subprocess.run([SYSTEM_PYTHON, "-c", script], check=True, timeout=300)
    return tmp_path


def test_torchvision_checkpoints_load_by_key_and_give_the_same_logits(tmp_path):
    folder = _torchvision_weights(tmp_path)
    for name in PUBLISHED_PARAMETERS:
        saved = torch.load(folder / f"{name}.pt", weights_only=True)
        arch, options = TORCHVISION_NAMES[name]
        net = create(arch, 3, 10, 64, **options).eval()
        assert set(net.state_dict()) == set(saved["state"])
        net.load_state_dict(saved["state"])
        with torch.no_grad(), one_thread():
            logits = net(saved["x"])
        scale = float(saved["y"].abs().max())
        assert torch.allclose(logits, saved["y"], atol=1e-5 * max(1.0, scale), rtol=0), name


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return build_imagenet_folder(tmp_path_factory.mktemp("inet") / "imagenet", per_class=2, val_per_class=1)


def test_arch_file_teachers_load_pth_and_safetensors(tmp_path, small_folder):
    real = load_dataset(f"imagenet:{small_folder}", image_size=32)
    torch.manual_seed(3)
    reference = create("imagenet_resnet18", 3, 10, 32).eval()
    state = reference.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for file in ("r18.pth", "r18.safetensors"):
        teacher = pretrained.resolve_teacher(f"imagenet_resnet18:{tmp_path / file}", real)
        with one_thread():
            assert torch.equal(teacher.model(x), reference(x)) and not teacher.model.training
        assert teacher.model_config["arch"] == "imagenet_resnet18"
    with pytest.raises(DDKitError, match="does not fit this network"):
        pretrained.resolve_teacher(f"imagenet_mobilenet_v2:{tmp_path / 'r18.pth'}", real)
    with pytest.raises(DDKitError, match="does not exist"):
        pretrained.resolve_teacher(f"imagenet_resnet18:{tmp_path / 'missing.pth'}", real)
    torch.save(create("imagenet_resnet18", 3, 5, 32).state_dict(), tmp_path / "five.pth")
    with pytest.raises(DDKitError, match="does not fit"):
        pretrained.resolve_teacher(f"imagenet_resnet18:{tmp_path / 'five.pth'}", real)


def test_torchvision_and_timm_teachers_without_the_package_are_one_line_errors(small_folder, monkeypatch):
    import sys

    real = load_dataset(f"imagenet:{small_folder}", image_size=32)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    for spec, package in (("torchvision:resnet18", "torchvision"), ("timm:resnet18", "timm")):
        with pytest.raises(DDKitError, match=f"needs {package}") as err:
            pretrained.resolve_teacher(spec, real)
        assert "\n" not in str(err.value)


def test_class_order_check_refuses_a_teacher_of_renamed_folders(tmp_path):
    """A teacher trained on the folder passes; the same folder with its class folders renamed out
    of order (class k's images under the name of class k+1) refuses it with one line."""
    root = build_imagenet_folder(tmp_path / "inet", per_class=6, val_per_class=1)
    weights = train_tiny_teacher(root, tmp_path / "teacher.safetensors")
    spec = f"{TEACHER_ARCH}:{weights}"
    real = load_dataset(f"imagenet:{root}", image_size=32)
    accuracy = pretrained.check_class_order(pretrained.resolve_teacher(spec, real), real)
    assert accuracy >= 0.9
    renamed = tmp_path / "renamed"
    shutil.copytree(root, renamed)
    for k, wnid in enumerate(WNIDS):
        (renamed / "train" / wnid).rename(renamed / "train" / f"tmp{k}")
    for k in range(len(WNIDS)):
        (renamed / "train" / f"tmp{k}").rename(renamed / "train" / WNIDS[(k + 1) % len(WNIDS)])
    shuffled = load_dataset(f"imagenet:{renamed}", image_size=32)
    with pytest.raises(DDKitError, match="another order") as err:
        pretrained.check_class_order(pretrained.resolve_teacher(spec, shuffled), shuffled)
    assert "\n" not in str(err.value) and "--no-class-check" in str(err.value)
    assert pretrained.parse_arch("convnet(width=16, norm=batch, x=0.5)") == (
        "convnet", {"width": 16, "norm": "batch", "x": 0.5})
    assert pretrained.class_check_threshold(10) == pytest.approx(0.3)
    assert pretrained.class_check_threshold(1000) == pytest.approx(0.1009, abs=1e-4)

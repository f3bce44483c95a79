"""The ImageNet-1K / ImageNet-21K paper presets of SRe2L, CDA and G-VBSM and their --plan."""

import pytest
from PIL import Image

from ddkit.cli import main
from ddkit.data import streaming
from ddkit.errors import DDKitError
from ddkit.methods import stats_family


@pytest.fixture
def fake_imagenet(tmp_path, monkeypatch):
    """Three wnid folders of one blank JPEG each and a labelled val/; decoding any image fails,
    so a test passes only if nothing is decoded."""
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "train" / wnid / f"{wnid}_1.JPEG")
    (tmp_path / "val").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n"
                                                          "ILSVRC2012_val_00000001,n01443537 1 2 3 4\n")

    def refuse(path, channels):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(streaming, "open_image", refuse)
    return tmp_path


def test_cda_plan_prints_the_published_imagenet_recipe_without_decoding(fake_imagenet, capsys):
    code = main(["distill", "cda", "--dataset", f"imagenet:{fake_imagenet}", "--teacher", "torchvision:resnet18",
                 "--preset", "paper", "--plan"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cda's published recipe for imagenet (reference imagenet1k)" in out
    assert "3x224x224, 3 classes" in out
    assert "4000 iterations, Adam lr 0.25" in out and "batches of 100" in out
    assert "CDA cosine curriculum to milestone 1" in out and "roll of 0..32 px" in out
    assert "r_bn 0.01" in out and "x10 on the first hooked module" in out
    assert "relabel: 300 epochs of RandomResizedCrop (scale 0.08-1)" in out and "cutmix" in out
    assert "recipe sre2l-imagenet (adamw lr 0.001, wd 0.01 (1-d exempt), cosine_epoch, 300 epochs" in out
    assert "KL T 20" in out and "student imagenet_resnet18" in out
    assert "IPC 50: 53.5 %" in out and "squeeze: none" in out
    assert "torchvision:resnet18" in out.splitlines()[-1]


def test_gvbsm_imagenet_preset_is_the_published_one(fake_imagenet):
    config = stats_family.resolve_preset("gvbsm", f"imagenet:{fake_imagenet}", 10, "paper")
    assert [t["pretrained"] for t in config["teachers"]] == [
        "torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
        "torchvision:shufflenet_v2_x0_5"]
    rc, rl = config["recover"], config["relabel"]
    assert (rc["iterations"], rc["lr"], rc["batch_size"], rc["r_bn"], rc["r_conv"]) == (4000, 0.1, 80, 0.01, 0.01)
    assert (rc["patch_size"], rc["ema_alpha"], rc["conv_drop"], rc["densify_weight"]) == (16, 0.4, 0.0, 1.0)
    assert (rc["crop"], rc["jitter"], rc["first_multiplier"]) == ("resized", 32, 10.0)
    assert rl["equalize_norm"] is True and rl["epochs"] == 300 and rl["eval_loss"] == "mse_ce"
    from ddkit.evaluate.soft import resolve_soft_config

    student = resolve_soft_config("paper", rl["eval_recipe"])
    assert (student["optimizer"], student["lr"], student["weight_decay"], student["epochs"], student["gamma"]) == (
        "adamw", 1e-3, 0.01, 300, 0.1)


def test_cda_imagenet21k_and_the_fallbacks(fake_imagenet):
    config = stats_family.resolve_preset("cda", f"imagenet21k:{fake_imagenet}", 10, "paper")
    rc = config["recover"]
    assert (rc["iterations"], rc["lr"], rc["r_bn"], rc["curriculum"]) == (2000, 0.05, 0.25, "cosine")
    assert stats_family.reference_for("sre2l", f"imagenet21k:{fake_imagenet}")[0] == "imagenet1k"
    assert stats_family.reference_for("gvbsm", f"imagenet:{fake_imagenet}")[0] == "imagenet1k"
    with pytest.raises(DDKitError, match="--teacher imagenet_resnet18:FILE"):
        stats_family.method_teachers(stats_family.dataset_facts(f"imagenet21k:{fake_imagenet}"), config, 0, "cpu")

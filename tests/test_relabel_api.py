"""``ddkit.relabel``: any set relabelled as a statistics method relabels its own, the one pipeline
behind ``ddkit relabel`` and the bench's ``random+M`` cells."""

import torch

import ddkit
from ddkit.cli import main
from ddkit.evaluate import random_subset

OPTIONS = {"relabel.epochs": 2, "squeeze.epochs": 1, "squeeze.train_subset": 300}


def test_relabel_stores_records_and_matches_the_command_line(digits, isolated_data, tmp_path):
    subset = random_subset(digits, 2, seed=0)
    relabelled = ddkit.relabel(subset, "sre2l", preset="smoke", seed=0, overrides=OPTIONS, show_progress=False)
    assert torch.equal(relabelled.images, subset.images) and torch.equal(relabelled.labels, subset.labels)
    assert relabelled.extras["relabel.logits"].shape == (2, 20, 10)
    assert relabelled.meta["relabelled_like"] == {"method": "sre2l", "preset": "smoke"}
    assert relabelled.meta["relabel"]["epochs"] == 2 and len(relabelled.meta["relabel"]["teacher_info"]) == 1
    assert {"squeeze_seconds", "relabel_seconds"} <= set(relabelled.meta["timings"])
    subset.save(tmp_path / "set")
    assert main(["relabel", str(tmp_path / "set"), "--like", "sre2l", "--preset", "smoke", "-q",
                 *[f"--set={key}={value}" for key, value in OPTIONS.items()]]) == 0
    from_cli = ddkit.load(tmp_path / "set")
    assert from_cli.extras.keys() == relabelled.extras.keys()
    assert all(torch.equal(from_cli.extras[key], relabelled.extras[key]) for key in relabelled.extras)

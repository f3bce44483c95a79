"""`ddkit config` and `ddkit distill --config`: the merged options of a run as YAML, read back;
one declaration of the tiers; one seeded model builder; one resolve_preset signature."""

import pytest
import torch
import yaml

import ddkit
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.methods import get_spec, method_names
from ddkit.methods import dm_family, stats_family
from ddkit.methods.runconfig import changed_leaves, dump_run_config, read_run_config, run_config
from ddkit.models import build
from ddkit.tiers import TIERS, check_tier, check_tier_table


def write(path, document):
    path.write_text(dump_run_config(document, str(path)))
    return path


# ---- the configuration a run uses -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dm", "idm", "sre2l", "gvbsm"])
def test_config_prints_what_the_method_resolves(method, capsys):
    assert main(["config", method, "--dataset", "fashion-mnist", "--ipc", "10", "--preset", "quick"]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert (document["method"], document["dataset"], document["ipc"], document["preset"], document["seed"]) == \
        (method, "fashion-mnist", 10, "quick", 0)
    resolved = get_spec(method).resolve("fashion-mnist", 10, "quick")
    assert changed_leaves(document["options"], yaml.safe_load(yaml.safe_dump(resolved))) == []
    assert document["options"].keys() == resolved.keys()


def test_config_applies_terms_weights_and_set_like_distill(capsys):
    main(["config", "dm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--terms", "cm",
          "--weight", "mean=2", "--set", "iterations=7"])
    options = yaml.safe_load(capsys.readouterr().out)["options"]
    assert options["weights"]["cm"] == dm_family.default_weights()["cm"]
    assert options["weights"]["mean"] == 2.0 and options["iterations"] == 7


def test_config_of_the_random_baseline_has_no_options(capsys):
    main(["config", "random", "--dataset", "digits", "--ipc", "2"])
    assert yaml.safe_load(capsys.readouterr().out)["options"] == {}


@pytest.mark.parametrize("words, message", [
    (["config", "sre2l", "--dataset", "digits", "--ipc", "2", "--terms", "cm"], "does not take --terms"),
    (["config", "dm", "--dataset", "digits", "--ipc", "2", "--set", "nosuch=1"], "unknown dm option 'nosuch'"),
    (["config", "dm", "--dataset", "digits", "--ipc", "2", "--preset", "huge"], "unknown preset 'huge'"),
    (["config", "random", "--dataset", "digits", "--ipc", "2", "--set", "x=1"], "no options to set"),
])
def test_config_refuses_bad_input_in_one_line(words, message, capsys):
    assert main(words) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_config_out_writes_a_file_and_refuses_to_replace_one(tmp_path, capsys):
    out = tmp_path / "dm.yaml"
    assert main(["config", "dm", "--dataset", "digits", "--ipc", "2", "--out", str(out)]) == 0
    assert f"ddkit distill --config {out}" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["method"] == "dm"
    assert main(["config", "dm", "--dataset", "digits", "--ipc", "3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["config", "dm", "--dataset", "digits", "--ipc", "3", "--out", str(out), "--overwrite"]) == 0
    assert yaml.safe_load(out.read_text())["ipc"] == 3


# ---- reading a file back ----------------------------------------------------------------------------
def test_an_unedited_file_reads_back_as_no_overrides(tmp_path):
    for method in ("dm", "gvbsm"):
        path = write(tmp_path / f"{method}.yaml", run_config(method, "digits", 2, "smoke", seed=3))
        read = read_run_config(path)
        assert read == {"method": method, "dataset": "digits", "ipc": 2, "preset": "smoke", "seed": 3,
                        "overrides": {}}


def test_edited_values_become_overrides_checked_like_set(tmp_path):
    document = run_config("gvbsm", "digits", 2, "smoke")
    document["options"]["recover"]["lr"] = 0.07
    document["options"]["teachers"] = document["options"]["teachers"][:1]
    read = read_run_config(write(tmp_path / "c.yaml", document))
    assert read["overrides"] == {"recover.lr": 0.07, "teachers": document["options"]["teachers"]}
    document = run_config("dm", "digits", 2, "smoke")
    document["options"]["model"]["width"] = 8
    document["options"]["itrations"] = 5
    with pytest.raises(DDKitError, match="unknown dm option 'itrations'"):
        read_run_config(write(tmp_path / "d.yaml", document))
    del document["options"]["itrations"]
    assert read_run_config(write(tmp_path / "d.yaml", document))["overrides"] == {"model.width": 8}


def test_changed_leaves_compares_mappings_key_by_key_and_lists_whole():
    base = {"a": 1, "m": {"w": 4, "d": None}, "l": [1, 2]}
    assert changed_leaves({"a": 1, "m": {"w": 4, "d": None}, "l": [1, 2]}, base) == []
    assert changed_leaves({"a": 2, "m": {"w": 4, "x": 1}, "l": [1]}, base) == [("a", 2), ("m.x", 1), ("l", [1])]


@pytest.mark.parametrize("text, message", [
    ("- a list\n", "must be a YAML mapping"),
    ("method: dm\ndataset: digits\n", "lacks ipc"),
    ("method: dm\ndataset: digits\nipc: 0\n", "ipc must be an integer >= 1"),
    ("method: dm\ndataset: digits\nipc: 2\nflavour: x\n", "unknown field(s) flavour"),
    ("method: dm\ndataset: digits\nipc: 2\npreset: fast\n", "unknown preset 'fast'"),
    ("method: dm\ndataset: digits\nipc: 2\noptions: [1]\n", "options must be a mapping"),
    ("method: dm\n  dataset: [\n", "cannot read configuration file"),
])
def test_a_bad_file_is_refused_in_one_line(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DDKitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_run_config(path)
    with pytest.raises(DDKitError, match="not found; write one with: ddkit config"):
        read_run_config(tmp_path / "missing.yaml")


def test_distill_runs_an_edited_file_and_the_command_line_wins(tmp_path, capsys):
    document = run_config("dm", "digits", 1, "smoke", seed=5)
    document["options"]["iterations"] = 2
    document["options"]["lr_img"] = 0.5
    path = write(tmp_path / "run.yaml", document)
    out = tmp_path / "set"
    assert main(["distill", "--config", str(path), "--out", str(out), "--quiet", "--set", "lr_img=0.25",
                 "--ipc", "2"]) == 0
    assert "note: --ipc 2 given; " in capsys.readouterr().err
    made = ddkit.load(out)
    assert made.ipc == 2 and made.meta["seeds"]["run"] == 5
    expected = dm_family.resolve_preset("dm", "digits", 2, "smoke", {"iterations": 2, "lr_img": 0.25})
    assert made.meta["config"] == expected


def test_distill_refuses_config_with_resume(tmp_path, capsys):
    path = write(tmp_path / "run.yaml", run_config("dm", "digits", 1, "smoke"))
    assert main(["distill", "--config", str(path), "--resume", str(tmp_path)]) == 2
    assert "--config starts a run; --resume continues one" in capsys.readouterr().err


# ---- one declaration of the tiers, one builder, one signature ---------------------------------------
def test_every_tier_table_has_exactly_the_declared_tiers():
    from ddkit.evaluate.protocols import HARD_PRESETS
    from ddkit.evaluate.soft import SOFT_PRESETS, SOFT_TIER_CAPS
    from ddkit.methods.squeeze import SQUEEZE_PRESETS

    for table in (HARD_PRESETS, SOFT_PRESETS, SOFT_TIER_CAPS, SQUEEZE_PRESETS, dm_family.TIER_SETTINGS,
                  stats_family.TIERS):
        assert tuple(sorted(table)) == tuple(sorted(TIERS))
    with pytest.raises(DDKitError, match="must define exactly the tiers smoke, quick, paper; it has quick"):
        check_tier_table({"quick": {}}, "TABLE")
    with pytest.raises(DDKitError, match="unknown squeeze preset 'fast'; choose one of: smoke, quick, paper"):
        check_tier("fast", "squeeze preset")


@pytest.mark.parametrize("method", [name for name in method_names() if get_spec(name).resolve is not None])
def test_every_method_refuses_an_unknown_tier_the_same_way(method):
    spec = get_spec(method)
    with pytest.raises(DDKitError, match="unknown preset 'fast'; choose one of: smoke, quick, paper"):
        spec.resolve("digits", 2, "fast")


def test_build_draws_the_same_weights_from_a_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = build("convnet", 1, 10, 8, seed=7, width=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = build("convnet", 1, 10, 8, seed=7, width=8)
    third = build("convnet", 1, 10, 8, seed=8, width=8)
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))


def test_both_families_resolve_presets_with_one_signature_and_the_old_spelling_still_works():
    new = stats_family.resolve_preset("gvbsm", "digits", 10, "smoke", ["lr=0.2"])
    assert stats_family.resolve_preset("gvbsm", "digits", "smoke", ["lr=0.2"]) == new
    assert new["recover"]["lr"] == 0.2
    matching = dm_family.resolve_preset("dm", "digits", 10, "smoke", ["iterations=3"], terms="cm")
    assert matching["iterations"] == 3 and matching["weights"]["cm"] > 0


# ---- option constraints as data -----------------------------------------------------------------------
def test_option_tables_check_each_declared_option_in_one_line():
    from ddkit import options as rules

    table = {"steps": rules.number(integer=True, minimum=1), "pad": rules.number(minimum=0, allow=("auto",)),
             "alpha": rules.number(minimum=0, maximum=1, allow=(None,)), "flip": rules.flag(allow=("auto",)),
             "queue.mode": rules.choice("a", "b")}
    good = {"steps": 3, "pad": "auto", "alpha": None, "flip": True, "queue": {"mode": "b"}}
    rules.check_table(good, table, "toy")
    rules.check_table({"steps": 1}, table, "toy")  # options the configuration lacks are not checked
    for bad, message in [({"steps": 0}, "toy option steps=0 is not valid; give an integer >= 1"),
                         ({"steps": True}, "toy option steps=True is not valid; give an integer >= 1"),
                         ({"pad": "none"}, "toy option pad='none' is not valid; give a number >= 0, or auto"),
                         ({"alpha": 2}, "toy option alpha=2 is not valid; give a number >= 0 and <= 1, or null"),
                         ({"flip": "yes"}, "toy option flip='yes' is not valid; give true or false, or auto"),
                         ({"queue": {"mode": "c"}}, "toy option queue.mode='c' is not valid; choose one of: a, b")]:
        with pytest.raises(DDKitError) as caught:
            rules.check_table({**good, **bad}, table, "toy")
        assert str(caught.value) == message


def test_the_engines_declare_their_options_as_tables():
    from ddkit.methods.matching import ENGINE_OPTIONS
    from ddkit.methods.recover import RECOVER_OPTIONS

    matching = dm_family.resolve_preset("dm", "digits", 2, "smoke")
    recover = stats_family.resolve_preset("gvbsm", "digits", 2, "smoke")["recover"]
    from ddkit.options import lookup

    # every declared option is one the presets set, but the old spelling that a resumed run may carry
    assert [name for name in ENGINE_OPTIONS if lookup(matching, name, "missing") == "missing"] == \
        ["legacy_step_per_class"]
    assert [name for name in RECOVER_OPTIONS if lookup(recover, name, "missing") == "missing"] == []


def test_a_statistics_method_can_start_from_another_published_recipe(tmp_path, capsys):
    own = stats_family.resolve_preset("gvbsm", "cifar10", 10, "paper")
    other = stats_family.resolve_preset("gvbsm", "cifar10", 10, "paper", ["reference=cifar100", "lr=0.2"])
    cifar100 = stats_family.resolve_preset("gvbsm", "cifar100", 10, "paper")
    assert own["reference"] == "cifar10" and other["reference"] == "cifar100"
    assert other["teachers"] == cifar100["teachers"] and other["recover"] == {**cifar100["recover"], "lr": 0.2}
    with pytest.raises(DDKitError, match="reference='tiny2' is not valid; gvbsm publishes recipes for: "):
        stats_family.resolve_preset("gvbsm", "cifar10", 10, "paper", ["reference=tiny2"])
    # an edited configuration file's reference works the same way
    document = run_config("gvbsm", "cifar10", 10, "paper")
    document["options"]["reference"] = "cifar100"
    assert read_run_config(write(tmp_path / "g.yaml", document))["overrides"] == {"reference": "cifar100"}
    assert main(["distill", "--config", str(tmp_path / "g.yaml"), "--plan"]) == 0
    assert "recipe for cifar100, chosen with --set reference=cifar100 (reference cifar100)" in capsys.readouterr().out

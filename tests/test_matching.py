"""The distribution-matching engine and the DM / IDM / IID / DDM presets, on real digits."""

import pytest
import torch

import ddkit
from conftest import compiler_missing
from ddkit.augment.grouped import siamese_per_class
from ddkit.augment import DSA
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, random_subset
from ddkit.methods.dm_family import apply_term_flags, resolve_preset
from ddkit.methods import matching
from ddkit.methods.matching import MatchingEngine, initial_images
from ddkit.methods.terms import MATCHING_TERMS, class_mean_taps
from ddkit.methods.sources import ModelQueue, PretrainedPool
from ddkit.utils import apply_overrides, make_generator

CPU = torch.device("cpu")


def smoke(method, ipc=2, **overrides):
    return apply_overrides(resolve_preset(method, "digits", ipc, "smoke"), overrides)


def test_batched_pass_equals_per_class_loop(digits):
    """Instance norm couples no samples: one forward for all classes == one forward per class."""
    config = smoke("dm", iterations=3, real_chunk=5)
    batched = MatchingEngine(digits, 2, config, seed=3, device=CPU, show_progress=False).run("dm")
    per_class = MatchingEngine(digits, 2, apply_overrides(config, {"forward": "per_class"}), seed=3,
                               device=CPU, show_progress=False).run("dm")
    assert torch.allclose(batched.images, per_class.images, atol=1e-5)
    assert not torch.allclose(batched.images, initial_images(digits, 2, 1, "real", make_generator(3)), atol=1e-4)


@pytest.mark.parametrize("method, terms", [("ddm", "cm,gram"), ("idm", "cm,style,icd")])
def test_every_term_has_the_same_value_batched_and_per_class(digits, method, terms):
    """Each term sums over classes, so one forward for ten classes gives the per-class total (ICD too)."""
    config = apply_term_flags(smoke(method, iterations=1, image_step="per_iteration", legacy_style_accumulator=True),
                              terms=terms)
    logs = {}
    for forward in ("batched", "per_class"):
        engine = MatchingEngine(digits, 3, apply_overrides(config, {"forward": forward}), seed=2, device=CPU,
                                show_progress=False)
        if method == "idm":  # a trained net, so the CE term is not zero
            engine.source.meters = [[3, 4]] * len(engine.source.nets)
        logs[forward] = engine.run(method).meta["loss_log"][0]
    assert set(logs["batched"]) >= {"mean", "cm", "icd", "total"} and logs["batched"]["icd"] < 0
    for term, value in logs["batched"].items():
        assert value == pytest.approx(logs["per_class"][term], rel=1e-4, abs=1e-6), term


def test_a_channels_last_real_side_gives_the_same_images(digits):
    """The layout is a speed option only: same nets, same draws, same images to float rounding.
    With it on, the real side runs through a channels-last twin of each network and the synthetic
    side through the network itself, in the standard layout."""
    # DDM's style terms read the intermediate maps too. Its smoke step (lr 1, style weight 1e4) is
    # chaotic: rounding differences grow about a hundredfold per iteration (on an AMD EPYC, mean
    # 7e-6 after one iteration, 6e-4 after three), so DDM is compared after one.
    for method, iterations in (("dm", 3), ("ddm", 1)):
        config = smoke(method, iterations=iterations)
        runs = {}
        for layout in (True, False):
            engine = MatchingEngine(digits, 2, apply_overrides(config, {"channels_last": layout}), seed=3, device=CPU,
                                    show_progress=False)
            net, _ = engine.source.next(0)
            real_side = engine._real_side_net(net)
            last_conv = [m for m in real_side.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # the first has 1 channel
            assert last_conv.weight.is_contiguous(memory_format=torch.channels_last) is layout
            assert (real_side is net) is not layout and engine._real_side_net(net) is real_side  # one twin per net
            assert all(torch.equal(a, b) for a, b in zip(real_side.parameters(), net.parameters()))
            assert [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.is_contiguous()
            runs[layout] = engine.run(method).images
        difference = (runs[True] - runs[False]).abs()
        if method == "dm":
            assert float(difference.max()) < 1e-5
        else:  # one DDM step moves pixels by about 0.6 on average; a layout bug would show at that scale
            assert float(difference.mean()) < 1e-4 and float(difference.max()) < 1e-2
    assert MatchingEngine(digits, 2, smoke("dm"), seed=3, device=CPU, show_progress=False).real_side_channels_last  # auto


def test_a_network_with_running_statistics_keeps_its_own_real_side(digits):
    """BatchNorm's running statistics are updated by the real side's forward in training mode: a
    copy would keep those updates from the network, so such networks get no twin."""
    config = apply_overrides(smoke("dm", forward="per_class"), {"model.norm": "batch", "channels_last": True})
    engine = MatchingEngine(digits, 2, config, seed=0, device=CPU, show_progress=False)
    net, _ = engine.source.next(0)
    assert engine._real_side_net(net) is net


def engine_with_one_net(digits, config, monkeypatch):
    """An IPC-2 engine that matches with one fixed network and records every real batch it draws."""
    engine = MatchingEngine(digits, 2, config, seed=0, device=CPU, show_progress=False)
    net = engine.source.next(0)[0]
    monkeypatch.setattr(engine.source, "next", lambda iteration: (net, 1.0))
    real = []
    original = engine.sampler.per_class
    monkeypatch.setattr(engine.sampler, "per_class", lambda n, kept=None: real.append(original(n, kept)) or real[-1])
    return engine, net, real


def test_one_dm_step_matches_the_formula(digits, monkeypatch):
    """One iteration = one SGD step on sum_c ||mean f(real_c) - mean f(syn_c)||^2 (no DSA)."""
    config = smoke("dm", dsa=False, lr_img=0.5, momentum_img=0.0, batch_real=4)
    engine, net, real = engine_with_one_net(digits, config, monkeypatch)
    before = torch.cat(engine.synthetic).detach().clone()
    values = engine.step(0)

    syn = before.clone().requires_grad_(True)
    real_mean = net.embed(real[0]).detach().reshape(10, 4, -1).mean(1)
    loss = ((real_mean - net.embed(syn).reshape(10, 2, -1).mean(1)) ** 2).sum()
    loss.backward()
    assert values["mean"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(torch.cat(engine.synthetic).detach(), before - 0.5 * syn.grad, atol=1e-6)


def test_siamese_per_class_shares_a_draw_within_each_class():
    dsa = DSA("crop_flip")
    real = torch.rand(3, 1, 8, 8).repeat_interleave(4, 0)  # class c's 4 real images are identical
    syn = real[::4].repeat_interleave(2, 0)                  # and equal to its 2 synthetic ones
    real_aug, syn_aug = siamese_per_class(dsa, real, syn, 3, make_generator(5))
    for c in range(3):
        assert torch.equal(real_aug[4 * c], syn_aug[2 * c])
        assert torch.equal(real_aug[4 * c], real_aug[4 * c + 3])


def test_idm_partition_initialises_cells_from_distinct_real_images(digits):
    images = initial_images(digits, 1, 2, "real", make_generator(0))
    assert images.shape == (10, 1, 8, 8)
    cells = images.reshape(10, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(10, 4, 16)
    # the reference's plain bilinear downscale: every cell is the 2x2 mean of one real image of its class
    means = torch.nn.functional.avg_pool2d(digits.train.images.float() / 255.0, 2).reshape(-1, 16)
    for c in range(10):  # four different downscaled images per stored image
        assert len({tuple(cell.tolist()) for cell in cells[c]}) == 4
        of_class = means[digits.train.labels == c]
        for cell in cells[c]:
            assert (of_class - cell).abs().amax(dim=1).min() < 1e-6
    smoothed = initial_images(digits, 1, 2, "real", make_generator(0), downscale="antialias")
    assert not torch.allclose(smoothed, images)


def test_idm_run_records_decoding_and_evaluates_expanded(digits, tmp_path):
    ds = ddkit.distill("idm", dataset="digits", ipc=1, preset="smoke", out=tmp_path / "idm", show_progress=False)
    assert ds.decode == {"kind": "partition", "factor": 2}
    loaded = ddkit.load(tmp_path / "idm")
    assert loaded.decoded()[0].shape == (40, 1, 8, 8)
    result = evaluate(loaded, preset="smoke", runs=1, overrides={"epochs": 2}, show_progress=False, real=digits)
    assert result["convnet"].train_images == 40


@pytest.mark.skipif(compiler_missing(), reason="torch.compile on the CPU needs a C++ compiler (g++); none here")
def test_compiled_distillation_is_the_same_computation_and_compiles_once(digits, tmp_path):
    """``compiled``: the matching nets' forward through torch.compile gives the same images to float
    rounding, a fresh random network every iteration reuses the compiled kernels, and the
    manifest says so. DDM with local covariance reads block, feature and embedding taps."""
    from torch._dynamo.utils import counters

    options = dict(dataset="digits", ipc=2, preset="smoke", show_progress=False, terms="cm",
                   overrides={"iterations": 6})
    eager = ddkit.distill("ddm", out=tmp_path / "eager", **options)
    counters.clear()
    compiled = ddkit.distill("ddm", out=tmp_path / "compiled", compiled=True, **options)
    # two graphs: the real side (no gradient) and the synthetic side; six networks compiled nothing more
    assert counters["stats"]["unique_graphs"] == 2
    difference = (compiled.images - eager.images).abs()
    assert float(difference.mean()) < 1e-4 and float(difference.max()) < 1e-2  # DDM's 1e4 style weight
    assert not torch.equal(compiled.images, initial_images(digits, 2, 1, "real", make_generator(0)))
    assert ddkit.load(tmp_path / "compiled").meta["compiled"] is True
    assert "compiled" not in ddkit.load(tmp_path / "eager").meta


def queue_and_sampler(digits, **queue_options):
    from ddkit.methods.matching import RealSampler

    config = smoke("idm")
    queue = ModelQueue(config["model"], {**config["queue"], **queue_options}, digits, CPU, make_generator(0))
    return queue, RealSampler(digits, CPU, make_generator(1))


def test_model_queue_pushes_from_iteration_0_trains_and_caps(digits):
    queue, sampler = queue_and_sampler(digits, push_every=2, max_size=3, initial=2, accuracy_reset_every=0)
    queue.next(0)
    assert len(queue.nets) == 3  # the reference pushes at iteration 0 too
    for iteration in range(7):
        if iteration:
            queue.next(iteration)
        queue.after_step(iteration, sampler.mixed)
    assert len(queue.nets) == len(queue.optimizers) == len(queue.meters) == 3
    assert max(queue.accuracy(i) for i in range(3)) > 0.0
    assert all(p.requires_grad is False for p in queue.next(7)[0].parameters())


def test_queued_nets_keep_their_optimiser_and_accumulate_accuracy_until_reset(digits):
    """IDM's reference: one SGD optimiser per queued net for its whole life (momentum carries over),
    accuracy counted over every step since the last reset of the meters, 2 distinct nets trained."""
    queue, sampler = queue_and_sampler(digits, initial=3, push_every=1000, train_nets=2, train_steps=2,
                                       train_batch=16, accuracy_reset_every=3)
    queue.next(0)  # pushes a fourth net
    optimizers = list(queue.optimizers)
    trained_per_call = []
    for iteration in range(3):
        if iteration:
            queue.next(iteration)
        before = [m[1] for m in queue.meters]
        queue.after_step(iteration, sampler.mixed)
        trained_per_call.append([i for i, m in enumerate(queue.meters) if m[1] > before[i]])
    assert all(a is b for a, b in zip(queue.optimizers, optimizers, strict=True))  # not fresh ones
    assert all(len(trained) == 2 for trained in trained_per_call)  # two DISTINCT nets each time
    assert sum(m[1] for m in queue.meters) == 3 * 2 * 2 * 16  # counted since the start
    net = queue.nets[trained_per_call[-1][0]]
    assert all("momentum_buffer" in queue.optimizers[trained_per_call[-1][0]].state[p] for p in net.parameters())
    queue.next(3)  # iteration 3: the reference's evaluation interval resets every meter
    assert all(m == [0, 0] for m in queue.meters) and queue.accuracy(0) == 0.0


def test_idm_resumes_its_queue_exactly(digits):
    """Kill-then-resume equals uninterrupted: queued nets, their momentum and their meters are state."""
    config = smoke("idm", iterations=4, **{"queue.push_every": 3})
    whole = MatchingEngine(digits, 2, config, seed=5, device=CPU, show_progress=False).run("idm").images
    first = MatchingEngine(digits, 2, apply_overrides(config, {"iterations": 2}), seed=5, device=CPU,
                           show_progress=False)
    first.run("idm")
    part = first.state_part()
    second = MatchingEngine(digits, 2, config, seed=5, device=CPU, show_progress=False)
    second.restore([part])
    for iteration in (2, 3):
        second.step(iteration)
    assert torch.equal(second.pixels(), whole)


def test_every_method_runs_and_logs_its_terms(digits):
    expected = {"dm": {"mean"}, "idm": {"mean", "ce"}, "iid": {"mean", "cm", "cc"},
                "idm-iid": {"mean", "ce", "cm", "cc"}, "ddm": {"mean", "style", "icd"}}
    for method, terms in expected.items():
        engine = MatchingEngine(digits, 2, smoke(method, iterations=2), seed=0, device=CPU, show_progress=False)
        result = engine.run(method)
        logged = set(result.meta["loss_log"][-1]) - {"iteration", "total"}
        assert logged == terms, method
        assert result.images.shape == (20, 1, 8, 8)


def test_term_flags_switch_on_and_reweight():
    config = resolve_preset("dm", "digits", 10, "smoke")
    flagged = apply_term_flags(config, terms=["cc,cm", "style"], weights=["style=2e3", "mean=0.5"])
    assert flagged["weights"] == {**config["weights"], "cc": 0.05, "cm": 0.01, "style": 2000.0, "mean": 0.5}
    assert apply_term_flags(config, terms="ce")["model_source"] == "queue"
    with pytest.raises(DDKitError, match="unknown loss term 'colour'"):
        apply_term_flags(config, terms="colour")
    with pytest.raises(DDKitError, match="non-negative"):
        apply_term_flags(config, weights=["style=-1"])
    with pytest.raises(DDKitError, match="term=value"):
        apply_term_flags(config, weights=["style"])


def test_published_settings_are_in_the_paper_presets():
    dm = resolve_preset("dm", "cifar10", 10, "paper")
    assert (dm["iterations"], dm["lr_img"], dm["momentum_img"], dm["batch_real"]) == (20000, 1.0, 0.5, 256)
    assert resolve_preset("dm", "cifar10", 100, "paper")["lr_img"] == 10.0  # DM's README for IPC >= 100
    idm = resolve_preset("idm", "cifar100", 10, "paper")
    assert (idm["lr_img"], idm["partition"], idm["weights"]["ce"], idm["queue"]["train_steps"]) == (0.2, 2, 0.1, 50)
    assert (idm["ce_accuracy_scale"], idm["image_step"], idm["queue"]["accuracy_reset_every"]) == (100.0, "per_class", 100)
    assert resolve_preset("idm", "cifar10", 1, "paper")["queue"]["push_every"] == 5
    assert resolve_preset("idm", "tiny-imagenet", 1, "paper")["queue"]["push_every"] == 30
    assert resolve_preset("idm", "tiny-imagenet", 50, "paper")["queue"]["accuracy_reset_every"] == 1000
    for dataset in ("mnist", "fashion-mnist"):  # no published IDM settings: CIFAR-10's
        for ipc in (1, 10, 50):
            assert resolve_preset("idm", dataset, ipc, "paper") == resolve_preset("idm", "cifar10", ipc, "paper")
    assert resolve_preset("idm", "fashion-mnist", 50, "paper")["weights"]["ce"] == 0.1
    pool = resolve_preset("iid", "cifar10", 10, "paper")["cc"]
    assert (pool["pool_size"], pool["epochs"], pool["lr"], pool["lr_decay_factor"]) == (1000, 40, 0.01, 1.0)
    iid = resolve_preset("iid", "cifar10", 10, "paper")["weights"]
    assert (iid["cm"], iid["cc"]) == (0.01, 0.05)
    idm_iid = resolve_preset("idm-iid", "cifar100", 50, "paper")["weights"]
    assert (idm_iid["cm"], idm_iid["cc"], idm_iid["ce"]) == (0.03, 0.01, 0.1)
    ddm = resolve_preset("ddm", "cifar10", 10, "paper")["weights"]
    assert (ddm["style"], ddm["icd"]) == (1e4, 10.0)


@pytest.mark.parametrize("overrides, match", [
    ({"weights.mean": -1.0}, "non-negative"),
    ({"weights.mean": 0.0}, "every loss term has weight 0"),
    ({"weights.ce": 0.5}, "needs trained networks"),
    ({"partition": 3}, "divisor"),
    ({"image_step": "sometimes"}, r"image_step='sometimes' is not valid; choose one of: per_iteration, per_class"),
    ({"init_downscale": "nearest"}, r"init_downscale='nearest' is not valid; choose one of: bilinear, antialias"),
    ({"queue.accuracy_reset_every": -1}, r"queue.accuracy_reset_every=-1 is not valid"),
    ({"icd.k": 0}, r"icd.k=0 is not valid"),
    ({"channels_last": "yes"}, r"channels_last='yes' is not valid; give true or false, or auto"),
    ({"lr_img": "abc"}, r"lr_img='abc' is not valid; give a number > 0"),
    ({"iterations": 0}, r"iterations=0 is not valid; give an integer >= 1"),
    ({"momentum_img": 1.5}, r"momentum_img=1.5 is not valid; give a number >= 0 and <= 1"),
    ({"dsa": "maybe"}, r"dsa='maybe' is not valid; give true or false"),
    ({"queue.train_steps": 2.5}, r"queue.train_steps=2.5 is not valid; give an integer >= 1"),
    ({"model_source": "zoo"}, r"model_source='zoo' is not valid; choose one of: random, queue"),
    ({"forward": "sideways"}, r"forward='sideways' is not valid; choose one of: batched, per_class"),
    ({"real_chunk": -1}, r"real_chunk=-1 is not valid; give an integer >= 0"),
])
def test_bad_engine_settings_are_refused(digits, overrides, match):
    with pytest.raises(DDKitError, match=match):
        MatchingEngine(digits, 2, smoke("dm", **overrides), seed=0, device=CPU, show_progress=False)


def test_a_real_batch_larger_than_a_class_takes_all_of_the_smallest_class(digits):
    """IDM's IPC-1 setting asks 5000 real images per class; the reference gets what a class has."""
    engine = MatchingEngine(digits, 1, smoke("dm", batch_real=100000, iterations=1), seed=0, device=CPU,
                            show_progress=False)
    smallest = int(torch.bincount(digits.train.labels).min())
    assert engine.batch_real == smallest
    assert engine.sampler.per_class(engine.batch_real).shape[0] == 10 * smallest
    assert resolve_preset("idm", "cifar100", 1, "paper")["batch_real"] == 5000


def test_ipc_larger_than_a_class_is_refused(digits):
    with pytest.raises(DDKitError, match="larger than the smallest class"):
        MatchingEngine(digits, 500, smoke("dm"), seed=0, device=CPU, show_progress=False)


def test_non_finite_loss_stops_and_keeps_last_good_images(tmp_path, digits, monkeypatch):
    import ddkit.methods.matching as matching

    calls = {"n": 0}
    original = matching.mean_feature_loss

    def explode_on_third(real, syn):
        calls["n"] += 1
        value = original(real, syn)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(matching, "mean_feature_loss", explode_on_third)
    with pytest.raises(DDKitError, match="iteration 2.*last good images were saved"):
        ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", out=tmp_path / "nan", show_progress=False)
    kept = ddkit.load(tmp_path / "nan")
    assert kept.meta["status"].startswith("stopped at iteration 2") and torch.isfinite(kept.images).all()


def test_pretrained_pool_is_cached_and_reused(digits, isolated_data, monkeypatch):
    config = {**smoke("iid")["cc"], "pool_size": 3, "in_memory": 1}
    first = PretrainedPool(config, digits, CPU)
    assert not list(isolated_data.glob("pretrained/digits/*"))  # members are trained when first drawn
    net = first.get(0)
    files = list(isolated_data.glob("pretrained/digits/*/model.safetensors"))
    assert len(files) == 1 and (files[0].parent / "manifest.json").is_file()
    first.get(1)
    assert list(first.loaded) == [1]  # at most in_memory members stay loaded
    import ddkit.methods.squeeze as squeeze_module

    monkeypatch.setattr(squeeze_module, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached net"))
    second = PretrainedPool(config, digits, CPU)
    for a, b in zip(net.state_dict().values(), second.get(0).state_dict().values()):
        assert torch.equal(a, b)


def test_a_compiled_engine_trains_its_feature_extractors_compiled(digits, isolated_data, monkeypatch):
    import ddkit.methods.sources as sources

    asked = []
    real_train = sources.train_cached
    monkeypatch.setattr(sources, "train_cached",
                        lambda *a, **k: asked.append(k["compiled"]) or real_train(*a, **dict(k, compiled=False)))
    for compiled in (True, False):
        MatchingEngine(digits, 2, smoke("iid"), seed=0, device=CPU, show_progress=False, compiled=compiled).pool.get(0)
    assert asked == [True, False]


def test_same_seed_same_images(digits):
    a = MatchingEngine(digits, 1, smoke("ddm", iterations=2), seed=7, device=CPU, show_progress=False).run("ddm")
    b = MatchingEngine(digits, 1, smoke("ddm", iterations=2), seed=7, device=CPU, show_progress=False).run("ddm")
    assert torch.equal(a.images, b.images)


@pytest.mark.slow
def test_dm_beats_the_random_subset_on_real_digits(digits):
    """The whole point: a short DM run on real data trains a better net than random real images."""
    overrides = {"iterations": 150, "batch_real": 64, "model.width": 32, "lr_img": 1.0}
    distilled = ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", overrides=overrides, seed=0,
                              show_progress=False)
    baseline = random_subset(digits, 1, seed=0)
    dm_acc = evaluate(distilled, preset="smoke", runs=3, show_progress=False, real=digits)["convnet"].mean
    random_acc = evaluate(baseline, preset="smoke", runs=3, show_progress=False, real=digits)["convnet"].mean
    assert dm_acc > random_acc + 3.0, (dm_acc, random_acc)


def test_per_class_steps_reapply_momentum(digits):
    """Without momentum IDM's per-class stepping equals one joint step; with it, it differs."""
    def run(step, momentum):
        config = smoke("dm", iterations=3, momentum_img=momentum, image_step=step)
        return MatchingEngine(digits, 2, config, seed=1, device=CPU, show_progress=False).run("dm").images

    assert torch.allclose(run("per_class", 0.0), run("per_iteration", 0.0), atol=1e-6)
    assert not torch.allclose(run("per_class", 0.5), run("per_iteration", 0.5), atol=1e-4)
    # a set made before the option was renamed still runs the same way on --resume
    stored = {**smoke("dm", iterations=3, momentum_img=0.5), "legacy_step_per_class": True}
    stored.pop("image_step")
    assert torch.equal(MatchingEngine(digits, 2, stored, seed=1, device=CPU, show_progress=False).run("dm").images,
                       run("per_class", 0.5))
    with pytest.raises(DDKitError, match="legacy_step_per_class is now image_step: --set image_step=per_class"):
        ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", overrides=["legacy_step_per_class=true"])


def test_per_class_steps_are_the_reference_loop(digits, monkeypatch):
    """IDM's loop: for each class, its loss on the CURRENT images, then one step of ONE momentum
    optimiser over all images (the other classes' gradients are zero, so momentum moves them)."""
    config = smoke("dm", dsa=False, lr_img=0.5, momentum_img=0.5, batch_real=4, image_step="per_class")
    engine, net, real = engine_with_one_net(digits, config, monkeypatch)
    images = torch.cat(engine.synthetic).detach().clone().requires_grad_(True)
    for iteration in range(2):
        engine.step(iteration)
    reference = torch.optim.SGD([images], lr=0.5, momentum=0.5)
    for batch in real:
        for c in range(10):
            target = net.embed(batch[c * 4:(c + 1) * 4]).detach().mean(0)
            loss = ((target - net.embed(images[c * 2:(c + 1) * 2]).mean(0)) ** 2).sum()
            reference.zero_grad()
            loss.backward()
            reference.step()
    assert torch.allclose(torch.cat(engine.synthetic).detach(), images.detach(), atol=1e-6)


def test_quick_class_centralization_extractor_has_a_small_pooled_embedding():
    """IID's CC weight was tuned on a pooled 512-d ResNet-18 embedding; an unpooled one lets CC dominate."""
    from ddkit.models import create

    options = dict(resolve_preset("iid", "fashion-mnist", 10, "quick")["cc"]["model"])
    net = create(options.pop("arch"), in_channels=1, num_classes=10, image_size=28, **options)
    for size in (28, 56):  # pooled: the embedding does not grow with the image
        assert net.embed(torch.zeros(2, 1, size, size)).shape == (2, 128)
    assert resolve_preset("iid", "fashion-mnist", 10, "paper")["cc"]["model"] == {"arch": "resnet18", "norm": "instance"}


def test_style_reads_class_means_of_the_real_maps_as_every_image_would_give(digits, monkeypatch):
    """DDM's style term reads only each class's mean map, so the real side averages its block maps
    chunk by chunk (chunks of 4 that straddle classes of 6 images) instead of keeping them all:
    the same loss and images to float rounding as from every image's maps."""
    blocks = ["block0", "block1"]
    assert class_mean_taps([MATCHING_TERMS["style"], MATCHING_TERMS["mean"]], blocks) == set(blocks)
    assert class_mean_taps([MATCHING_TERMS["style"], MATCHING_TERMS["gram"]], blocks) == set()  # gram: every image
    config = smoke("ddm", iterations=1, batch_real=6, real_chunk=4)
    runs = {}
    for means in (True, False):
        if not means:
            monkeypatch.setattr(matching, "class_mean_taps", lambda terms, blocks: set())
        result = MatchingEngine(digits, 2, config, seed=3, device=CPU, show_progress=False).run("ddm")
        runs[means] = result
    for term, value in runs[True].meta["loss_log"][0].items():
        assert value == pytest.approx(runs[False].meta["loss_log"][0][term], rel=1e-5, abs=1e-7), term
    assert float((runs[True].images - runs[False].images).abs().max()) < 1e-4




def test_the_queues_training_runs_in_the_runs_precision(digits):
    """IDM's queue trains its networks under the run's precision: bf16 passes (a convolution's
    output seen by a hook), the cross-entropy in fp32, weights stay fp32; fp32 is plain."""
    from ddkit.methods.matching import RealSampler

    config = smoke("idm")
    options = {**config["queue"], "initial": 1, "train_nets": 1, "train_steps": 1, "train_batch": 8}
    for name, expected in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        queue = ModelQueue(config["model"], options, digits, CPU, make_generator(0), name)
        seen = []
        conv = next(m for m in queue.nets[0].modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        before = [p.detach().clone() for p in queue.nets[0].parameters()]
        queue.after_step(0, RealSampler(digits, CPU, make_generator(1)).mixed)
        assert seen == [expected], name
        after = list(queue.nets[0].parameters())
        assert all(p.dtype == torch.float32 for p in after)
        assert any(not torch.equal(a, b) for a, b in zip(after, before)), name

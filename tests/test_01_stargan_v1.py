"""Tests for 01_stargan_v1.py (StarGAN). Small widths and images except for the parameter counts."""
import copy
import inspect
import json
import re
import shutil
import signal

import pytest
import torch
from PIL import Image

from common import UserError, load_checkpoint, save_checkpoint
from conftest import (LAYOUTS, ROOT, build_all, console_lines, load_script, stop_with_signal,
                      summary_files, widest_console_line, write_unreadable)
from data import toy
from data.datasets import CelebAAttrs

S = load_script("01_stargan_v1")
SMALL = dict(img_size=16, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=3, amp=False)


@pytest.fixture(autouse=True)
def _one_thread():
    # Runs after conftest's 2-thread fixture. These nets are tiny: one thread is as fast on an idle
    # machine and avoids a ~50x slowdown of 2 OpenMP threads when other jobs share the 2 cores.
    torch.set_num_threads(1)
    yield


def small(**kw):
    return S.Config(**{**SMALL, **kw})


def nets(cfg, sizes=(5,)):
    return build_all(S, cfg, list(sizes), torch.device("cpu"))


def batch(B=4, S_=16, A=5):
    x = torch.rand(B, 3, S_, S_) * 2 - 1
    c = (torch.rand(B, A) > 0.5).float()
    return x, c, c.flip(0)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------- networks
@pytest.mark.parametrize("size,B", [(16, 1), (32, 3)])
def test_shapes(size, B):
    cfg = small(img_size=size)
    G, D, _, _ = nets(cfg)
    x, c, _ = batch(B, size)
    x_fake = G(x, c)
    assert x_fake.shape == (B, 3, size, size) and x_fake.abs().max() <= 1
    src, cls = D(x_fake)
    assert src.shape == (B, 1, size // 8, size // 8) and cls.shape == (B, 5)


def test_param_counts_match_official():
    torch.set_default_device("meta")  # count without allocating or initialising 60M parameters
    try:
        full_size_counts()
    finally:
        torch.set_default_device("cpu")


def full_size_counts():
    assert n_params(S.Generator(64, 5, 6)) == 8_430_528
    assert n_params(S.Discriminator(128, 64, 5, 6)) == 44_762_048
    assert n_params(S.Discriminator(256, 64, 5, 6)) == 44_884_928  # official D at CelebA 256 px
    assert n_params(S.Generator(64, 8, 6)) == 8_439_936  # RaFD, c_dim 8
    # IN keeps no running statistics (Deviation): no buffers at all
    assert list(S.Generator(8, 5, 1).buffers()) == []


def official_state(net):
    """A state_dict in the official file layout: ours (random values) + the IN running-stat buffers
    that the official InstanceNorm2d(track_running_stats=True) saves."""
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.InstanceNorm2d):
            state.update({f"{name}.running_mean": torch.zeros(m.num_features),
                          f"{name}.running_var": torch.ones(m.num_features),
                          f"{name}.num_batches_tracked": torch.tensor(0)})
    return state


def test_official_layout_matches_reference():
    ref = LAYOUTS / "stargan_v1_celeba_128.txt"  # official keys and shapes (yunjey/stargan)
    with torch.device("meta"):
        nets_ = {"G": S.Generator(64, 5, 6), "D": S.Discriminator(128, 64, 5, 6)}
    for who, net in nets_.items():
        lines = [ln.split(" ", 2) for ln in ref.read_text().splitlines() if ln.startswith(who)]
        assert {k: tuple(v.shape) for k, v in official_state(net).items()} == {
            k: tuple(eval(shape)) for _, k, shape in lines}


def test_load_official_round_trip(tmp_path):
    G, D = S.Generator(8, 5, 2), S.Discriminator(32, 8, 5, 4)
    for who, net in (("G", G), ("D", D)):
        state = official_state(net)
        torch.save(state, tmp_path / f"200000-{who}.ckpt")
        S.load_official(tmp_path / f"200000-{who}.ckpt", net)
        for k, v in net.state_dict().items():
            assert torch.equal(v, state[k]), k
    with pytest.raises(UserError, match="200000-D.ckpt: not a checkpoint"):  # strict: D is no G
        S.load_official(tmp_path / "200000-D.ckpt", S.Generator(8, 5, 2))


# ---------------------------------------------------------------------------- losses
def test_wgan_signs():
    real, fake = torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2)
    base = S.adv_loss_d(real, fake)
    assert S.adv_loss_d(real + 1, fake) < base  # D's loss falls when D_src(real) rises
    assert S.adv_loss_d(real, fake + 1) > base  # ... and rises when D_src(fake) rises
    assert S.adv_loss_g(fake + 1) < S.adv_loss_g(fake)  # G's loss falls when D_src(fake) rises
    assert S.adv_loss_d(real + 2, fake).item() == pytest.approx(-2.0)


class LinearCritic(torch.nn.Module):
    """D_src(x) = scale·<u, x> with ‖u‖ = 1: gradient norm = scale everywhere."""

    def __init__(self, scale, dim=3 * 8 * 8):
        super().__init__()
        u = torch.randn(dim)
        self.u, self.scale = u / u.norm(), scale

    def forward(self, x):
        return (self.scale * (x.flatten(1) @ self.u)).view(-1, 1, 1, 1), None


class SquareCritic(torch.nn.Module):  # D_src(x) = ½‖x‖²: ∇ = x, so the penalty reads where x̂ lies
    def forward(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1).view(-1, 1, 1, 1), None


def test_gradient_penalty_values():
    x_real, x_fake = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    alpha = torch.rand(5, 1, 1, 1)
    for scale, gp in ((1.0, 0.0), (3.0, 4.0), (0.0, 1.0)):  # (‖∇‖ − 1)² with ‖∇‖ = scale
        assert S.gradient_penalty(LinearCritic(scale), x_real, x_fake, alpha).item() == \
            pytest.approx(gp, abs=1e-5)
    x_hat = alpha * x_real + (1 - alpha) * x_fake  # x̂ = α x + (1 − α) x̃, per sample
    expect = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(S.gradient_penalty(SquareCritic(), x_real, x_fake, alpha), expect)


def test_classification_and_reconstruction_losses():
    c = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    right, wrong = (c * 2 - 1) * 5, (1 - 2 * c) * 5
    assert S.cls_loss(right, c, True) < 0.1 < S.cls_loss(wrong, c, True)
    # multi-label: BCE summed over attributes, averaged over the batch (official)
    zero = S.cls_loss(torch.zeros(2, 3), c, True).item()
    assert zero == pytest.approx(3 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    assert S.cls_loss(torch.zeros(1, 3), one_hot, False).item() == pytest.approx(
        torch.log(torch.tensor(3.0)).item(), rel=1e-5)  # single-label: cross-entropy
    x = torch.rand(2, 3, 4, 4)
    assert S.rec_loss(x, x).item() == 0 and S.rec_loss(x, x + 0.5).item() == pytest.approx(0.5)


def test_lr_schedule_values():
    cfg = S.Config()  # 200k iterations, linear decay over the last 100k
    assert S.lr_at(0, 1e-4, cfg) == 1e-4 and S.lr_at(99_999, 1e-4, cfg) == 1e-4
    assert S.lr_at(150_000, 1e-4, cfg) == pytest.approx(5e-5)
    assert S.lr_at(199_999, 1e-4, cfg) == pytest.approx(1e-9)
    assert S.lr_at(200_000, 1e-4, cfg) == 0.0


def test_mask_vector_layout_and_known_part():
    sizes = [5, 3]
    c1 = torch.tensor([[1.0, 0, 0, 1, 1]])
    assert S.mask_label(c1, 0, sizes).tolist() == [[1, 0, 0, 1, 1, 0, 0, 0, 1, 0]]
    c2 = torch.tensor([[0.0, 0, 1]])
    assert S.mask_label(c2, 1, sizes).tolist() == [[0, 0, 0, 0, 0, 0, 0, 1, 0, 1]]
    assert S.mask_label(c1, 0, [5]) is c1  # one dataset: no mask vector
    # D classifies only the known part: the unknown logits get no gradient
    logits = torch.randn(1, 8, requires_grad=True)
    S.cls_loss(S.known_logits(logits, 1, sizes), c2, False).backward()
    assert logits.grad[:, :5].abs().sum() == 0 and logits.grad[:, 5:].abs().sum() > 0
    G, D, _, _ = nets(small(), sizes)
    assert G.main[0].in_channels == 3 + 5 + 3 + 2 and D.conv2.out_channels == 8


# ---------------------------------------------------------------------------- steps
def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def changed(net, before):
    return [not torch.equal(p, q) for p, q in zip(net.parameters(), before)]


def test_d_step_changes_only_D():
    cfg = small()
    G, D, opt_g, opt_d = nets(cfg)
    g0, d0 = snapshot(G), snapshot(D)
    losses = S.d_step(G, D, opt_d, *batch(), cfg)
    assert all(torch.isfinite(v) for v in losses.values())
    assert not any(changed(G, g0)) and all(changed(D, d0))
    assert all(p.grad is None for p in G.parameters())


def test_g_step_changes_only_G():
    cfg = small()
    G, D, opt_g, opt_d = nets(cfg)
    g0, d0 = snapshot(G), snapshot(D)
    losses = S.g_step(G, D, opt_g, *batch(), cfg)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["G/rec"] > 0
    assert all(changed(G, g0)) and not any(changed(D, d0))
    assert all(p.grad is None for p in D.parameters()) and all(p.requires_grad for p in D.parameters())


def test_each_weighted_term_reaches_the_gradient():
    """Eqs. (5)-(8): D's gradient is that of −L_adv + λ_gp GP + λ_cls L_cls^r, G's that of
    L_adv + λ_cls L_cls^f + λ_rec L_rec. With the other λs at 0 each term changes the gradient,
    in proportion to its λ: g(3) − g(0) = 3 (g(1) − g(0)). Same weights and draws each time."""
    G0, D0, _, _ = nets(small())
    data = batch()

    def grad(step, **lambdas):  # the gradient one d_step / g_step leaves in the net it updates
        cfg = small(**{"lambda_gp": 0.0, "lambda_cls": 0.0, "lambda_rec": 0.0, **lambdas})
        G, D = copy.deepcopy(G0), copy.deepcopy(D0)
        net = D if step is S.d_step else G
        torch.manual_seed(0)  # the GP's interpolation weights
        step(G, D, torch.optim.Adam(net.parameters()), *data, cfg)
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    for step, name in ((S.d_step, "lambda_gp"), (S.d_step, "lambda_cls"), (S.g_step, "lambda_cls"),
                       (S.g_step, "lambda_rec")):
        g0, g1, g3 = (grad(step, **{name: lam}) for lam in (0.0, 1.0, 3.0))
        assert (g1 - g0).norm() > 1e-3 * g0.norm(), (step.__name__, name)  # the term is there
        torch.testing.assert_close(g3 - g0, 3 * (g1 - g0), rtol=1e-3, atol=1e-4 * g0.abs().max(),
                                   msg=f"{step.__name__}: {name} is not its weight")


def test_train_step_d_every_step_g_every_n_critic(monkeypatch):
    """A D step every iteration, a G step every n_critic-th (§4), both towards the same targets:
    the batch's labels shuffled (official), not the source labels themselves."""
    cfg = small(n_critic=3)
    G, D, opt_g, opt_d = nets(cfg)
    x, c, _ = batch(B=8)
    calls = []
    for name in ("d_step", "g_step"):  # record (step, c_org, c_trg) of each call
        real = getattr(S, name)
        sig = inspect.signature(real)
        monkeypatch.setattr(S, name, lambda *a, _n=name, _f=real, _s=sig, **kw: calls.append(
            (_n, *map(_s.bind(*a, **kw).arguments.get, ("c_org", "c_trg")))) or _f(*a, **kw))
    keys = [set(S.train_step(G, D, opt_g, opt_d, x, c, step, cfg)) for step in range(6)]
    assert [n for n, *_ in calls] == ["d_step"] * 3 + ["g_step"] + ["d_step"] * 3 + ["g_step"]
    assert [any(k.startswith("G/") for k in ks) for ks in keys] == [False, False, True] * 2
    rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert all(torch.equal(c_org, c) and rows(c_trg) == rows(c) for _, c_org, c_trg in calls)
    assert sum(torch.equal(c_trg, c) for _, _, c_trg in calls) <= 1  # shuffled, not kept
    assert torch.equal(calls[3][2], calls[2][2])  # G's step: its iteration's targets


def test_resume_gives_identical_next_losses(tmp_path):
    cfg = small()
    torch.manual_seed(1)
    G, D, opt_g, opt_d = nets(cfg)
    data = [batch() for _ in range(3)]
    for b in data[:2]:
        S.d_step(G, D, opt_d, *b, cfg), S.g_step(G, D, opt_g, *b, cfg)
    save_checkpoint(tmp_path / "last.pt", 2, cfg, {"G": G, "D": D}, {"G": opt_g, "D": opt_d})
    expected = {**S.d_step(G, D, opt_d, *data[2], cfg), **S.g_step(G, D, opt_g, *data[2], cfg)}
    torch.manual_seed(123)  # a different RNG state: the checkpoint must restore it
    G2, D2, opt_g2, opt_d2 = nets(cfg)
    state = load_checkpoint(tmp_path / "last.pt", {"G": G2, "D": D2}, {"G": opt_g2, "D": opt_d2})
    assert state["step"] == 2
    got = {**S.d_step(G2, D2, opt_d2, *data[2], cfg), **S.g_step(G2, D2, opt_g2, *data[2], cfg)}
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


# ---------------------------------------------------------------------------- runs
TINY = ["--img-size", "32", "--g-conv-dim", "4", "--d-conv-dim", "4", "--g-repeat-num", "1",
        "--d-repeat-num", "4", "--batch", "4", "--log-every", "2", "--sample-every", "5",
        "--save-every", "5", "--cls-iters", "2"]


def test_short_toy_run_samples_resume_sample_eval(tmp_path, capsys):
    out = tmp_path / "run"
    S.main(TINY + ["--out", str(out), "--total-iters", "5", "--decay-iters", "4"])
    assert (out / "sample_000005.jpg").stat().st_size > 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 5 and state["config"]["n_critic"] == 5
    cfg = S.Config(**state["config"])  # the last step (4) ran mid-decay: lr0 · (5 − 4) / 4
    assert [state["opts"][k]["param_groups"][0]["lr"] for k in ("G", "D")] == pytest.approx(
        [cfg.g_lr / 4, cfg.d_lr / 4])
    g_steps = {float(s["step"]) for s in state["opts"]["G"]["state"].values()}
    d_steps = {float(s["step"]) for s in state["opts"]["D"]["state"].values()}
    assert g_steps == {1.0} and d_steps == {5.0}  # n_critic = 5: one G update per 5 D updates
    text = capsys.readouterr().out
    assert "oracle:" in text and "0.00 it/s" not in text
    assert console_lines(text) and all(len(ln) <= 120 for ln in console_lines(text))
    files = summary_files(text)  # the summary names what the run wrote
    assert [p.name for p in files["samples"]] == ["sample_000005.jpg"]
    assert [p.name for p in files["checkpoint"]] == ["last.pt", "log.jsonl"]
    assert all(p.is_file() for ps in files.values() for p in ps) and "loss curves" in files
    assert "target label read in: real" in text and f"eval --out {out}" in text
    with pytest.raises(UserError, match="--resume auto"):  # never silently overwritten
        S.main(TINY + ["--out", str(out), "--total-iters", "5"])
    S.main(TINY + ["--out", str(out), "--total-iters", "10", "--resume", "auto"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 10 and {float(s["step"]) for s in state["opts"]["G"]["state"].values()} == {2.0}
    face = next((ROOT / "data" / "toy" / "faces_32" / "images").iterdir())
    S.main(["sample", "--out", str(out), "--src", str(face), "--attrs-set", "Blond_Hair=1,Male=0"])
    assert (out / "sample_own.jpg").stat().st_size > 0
    with pytest.raises(UserError, match="attrs-set"):
        S.main(["sample", "--out", str(out), "--src", str(face), "--attrs-set", "Bald=1"])
    S.main(["eval", "--out", str(out), "--train-classifier", "--cls-iters", "2"])
    text = capsys.readouterr().out
    assert "oracle: real 100.0%" in text and "ResNet-18: real" in text


def test_joint_training_with_mask_vector(tmp_path):
    out = tmp_path / "joint"
    S.main(TINY + ["--out", str(out), "--total-iters", "5", "--data2", "toy"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["extra"]["names"] == [list(S.Config.attrs), ["circle", "square", "triangle"]]
    assert state["nets"]["G"]["main.0.weight"].shape[1] == 3 + 5 + 3 + 2
    assert state["nets"]["D"]["conv2.weight"].shape[0] == 5 + 3
    assert (out / "sample_000005.jpg").exists()


def test_unreadable_faces_are_named_once_and_skipped(tmp_path, capsys):
    root = tmp_path / "faces"
    toy.write_faces(root, 32, n=20, seed=0)
    held_out = CelebAAttrs(root, list(S.Config.attrs), "test").files  # 2 files: the fixed batch
    write_unreadable(held_out[0], "random")
    for f in CelebAAttrs(root, list(S.Config.attrs), "train").files[:3]:
        write_unreadable(f, "empty")
    S.main(TINY + ["--data", str(root), "--out", str(tmp_path / "run"), "--total-iters", "2"])
    err = capsys.readouterr().err
    assert err.count(f"skipping {held_out[0]}: cannot read") == 1, err
    assert (tmp_path / "run" / "sample_000002.jpg").exists()


def test_domain_folders_small_val_and_missing_val(tmp_path):
    root = tmp_path / "two"
    toy.write_shapes(root, 16, n_train=4, n_val=3, seed=0)
    for split in ("train", "val"):  # 2 domains: 6 val images, fewer than the 8 of the fixed batch
        shutil.rmtree(root / split / "triangle")
    S.main(TINY + ["--data", str(root), "--out", str(tmp_path / "a"), "--total-iters", "1"])
    assert (tmp_path / "a" / "sample_000001.jpg").exists()
    with pytest.raises(UserError, match=r"^--batch 9: the dataset has only 8 images"):
        S.main(TINY + ["--data", str(root), "--out", str(tmp_path / "b"), "--batch", "9"])
    shutil.rmtree(root / "val")
    with pytest.raises(UserError, match=rf"^{root / 'val'}: missing; a domain dataset needs"):
        S.main(TINY + ["--data", str(root), "--out", str(tmp_path / "c"), "--total-iters", "1"])


def test_bench_prints_one_line(capsys):
    S.main(TINY + ["--bench", "--bench-iters", "5"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "it/s" in line and "images/s" in line and "TFLOP/s" in line and "n/a" in line


# ---------------------------------------------------------------------------- faults
def break_D_after(calls_before_ctrl_c=None, nan_after=2):
    """d_step that leaves D non-finite after call `nan_after` and raises Ctrl-C at a call."""
    real, calls = S.d_step, []

    def broken(G, D, *a, **kw):
        calls.append(1)
        if len(calls) == calls_before_ctrl_c:
            raise KeyboardInterrupt
        losses = real(G, D, *a, **kw)
        if len(calls) == nan_after:  # finite losses, but the update broke D (as with lr 1e10)
            with torch.no_grad():
                next(D.parameters()).fill_(float("nan"))
        return losses
    return broken, calls


def test_interrupt_after_nan_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    S.main(TINY + ["--out", str(out), "--total-iters", "3", "--save-every", "3"])
    good = (out / "last.pt").read_bytes()
    broken, _ = break_D_after(calls_before_ctrl_c=3)
    monkeypatch.setattr(S, "d_step", broken)
    with pytest.raises(UserError, match=r"step 5: [GD]\.main\.0\.weight is not finite; stopping "
                                        rf"without saving. Last good checkpoint: {out}/last.pt"):
        S.main(TINY + ["--out", str(out), "--total-iters", "20", "--resume", "auto",
                       "--log-every", "100", "--save-every", "100"])
    assert (out / "last.pt").read_bytes() == good


def test_nan_stops_the_run_at_the_next_log_step(tmp_path, monkeypatch):
    broken, calls = break_D_after()
    monkeypatch.setattr(S, "d_step", broken)
    with pytest.raises(UserError, match=r"step 3: loss term 'D/\w+' is nan; stopping without"):
        S.main(TINY + ["--out", str(tmp_path), "--total-iters", "12", "--log-every", "1",
                       "--save-every", "100", "--sample-every", "100"])
    assert len(calls) == 3 and not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--batch", "0"], "--batch 0: must be ≥ 1"),
    (["--batch", "-4"], "--batch -4: must be ≥ 1"),
    (["--g-lr", "-1"], "--g-lr -1.0: must be > 0"),
    (["--d-lr", "-1"], "--d-lr -1.0: must be > 0"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    (["--data", "DOMAINS", "--img-size", "16"], "--img-size 16: D halves it 6 times")])
def test_bad_flags_are_one_line_errors(flags, msg, tmp_path):
    for split, domain in ((s, d) for s in ("train", "val") for d in ("a", "b")):  # not the toy
        (tmp_path / split / domain).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / domain / "0.png")
    with pytest.raises(UserError, match=re.escape(msg)):
        S.main([str(tmp_path) if f == "DOMAINS" else f for f in flags] + ["--out", str(tmp_path)])


@pytest.mark.parametrize("kind", ["empty", "truncated", "another script's", "not ours"])
def test_sample_with_a_bad_checkpoint_names_the_file(kind, tmp_path):
    path = tmp_path / "x.pt"
    cfg = load_script("04_stylegan_mapping").Config() if kind == "another script's" else small()
    save_checkpoint(path, 1, cfg, {"G": torch.nn.Linear(2, 2)}, {})
    if kind == "not ours":  # neither our last.pt nor an official *-G.ckpt
        torch.save({"weight": torch.zeros(2)}, path)
    cut = {"empty": b"", "truncated": path.read_bytes()[:900]}
    path.write_bytes(cut.get(kind, path.read_bytes()))
    for mode in ("sample", "eval"):
        with pytest.raises(UserError, match=re.escape(str(path)) + ": (cannot read this checkpoint"
                                            "|not a checkpoint of this script)"):
            S.main([mode, "--ckpt", str(path), "--src", str(path), "--out", str(tmp_path)])


def test_console_line_fits_120_columns():
    keys = ["D/adv", "D/gp", "D/cls", "G/adv", "G/cls", "G/rec"]
    line = widest_console_line(S.console_terms(S.Config()), keys, S.Config().total_iters)
    assert " G -0.148 " in line  # L_G = adv + λ_cls cls + λ_rec rec = -0.0123 · (1 + 1 + 10)


# ---------------------------------------------------------------------------- a cluster stops it
def test_stop_signal_saves_and_says_how_to_continue(tmp_path):
    """SIGTERM, a cluster's stop (SLURM at preemption or the time limit, torchrun, Kubernetes),
    saves like Ctrl-C:
    last.pt at the step reported, the log up to it, exit status 128 + signal number, and the
    command that continues the run."""
    out, flags = tmp_path / "run", ["--img-size", "32", "--g-conv-dim", "4", "--d-conv-dim", "4",
                                    "--g-repeat-num", "1", "--d-repeat-num", "4", "--batch", "4"]
    flags += ["--num-workers", "0", "--log-every", "1", "--save-every", "100000", "--sample-every",
              "100000", "--total-iters", "100000", "--out", str(out)]
    rc, text, err = stop_with_signal(["01_stargan_v1.py", *flags], signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", text)[1])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step >= 1
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    assert f"python 01_stargan_v1.py {' '.join(flags)} --resume auto" in text


def test_sample_names_and_skips_unreadable_src_files(tmp_path, capsys):
    """sample --src FOLDER: an unreadable file is named and skipped, as training does; the run
    fails (one line) only when no file is readable."""
    cfg, names = small(out=str(tmp_path)), ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male",
                                             "Young"]
    G, D, _, _ = nets(cfg)
    save_checkpoint(tmp_path / "last.pt", 1, cfg, {"G": G, "D": D}, {},
                    {"names": [names], "multi": [True]})
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 24), (200, 40, 40)).save(src / "a.png")
    write_unreadable(src / "b.png", "random")
    S.main(["sample", "--out", str(tmp_path), "--src", str(src)])
    said = capsys.readouterr()
    assert f"warning: skipping {src / 'b.png'}: cannot read this image" in said.err
    assert f"wrote {tmp_path / 'sample_own.jpg'}: 1 images x " in said.out  # the readable one
    write_unreadable(src / "a.png", "empty")
    with pytest.raises(UserError, match=f"--src {src}: none of its 2 image"):
        S.main(["sample", "--out", str(tmp_path), "--src", str(src)])


# ---------------------------------------------------------------------------- small val splits
@pytest.mark.parametrize("layout", [(1, 1), (2, 3), (9, 1)])
def test_any_val_layout_gives_matching_grids(layout, tmp_path, monkeypatch):
    """The fixed batch takes the val images of each domain in turn (up to 8): every domain shows
    up, even when the first one alone could fill the batch. Rows: one per image, each the image
    and its translations. Once: the first 8 files, all of the first domain."""
    root = tmp_path / "two"
    toy.write_shapes(root, 16, n_train=4, n_val=max(layout), seed=0)
    for split in ("train", "val"):
        shutil.rmtree(root / split / "triangle")
    for d, n in zip(("circle", "square"), layout):
        for f in sorted((root / "val" / d).iterdir())[n:]:
            f.unlink()
    grids, real = [], S.save_grid
    monkeypatch.setattr(S, "save_grid", lambda x, path, nrow, **kw: (
        grids.append((x.detach().cpu().clone(), nrow)), real(x, path, nrow, **kw)))
    S.main(TINY + ["--data", str(root), "--out", str(tmp_path / "a"), "--total-iters", "1"])
    images, nrow = grids[-1]
    n = min(8, sum(layout))
    assert nrow == 1 + 2 and len(images) == n * nrow  # the image, then one column per domain
    read = toy.read_shapes(images.view(n, nrow, *images.shape[1:])[:, 0].float())["domain"]
    turns = sorted((r, k) for k, c in enumerate(layout) for r in range(c))[:n]  # round robin
    want = sorted(k for _, k in turns)
    assert sorted(read.tolist()) == want


def test_grid_columns_are_titled_as_target_labels_orders_them():
    names = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young"]
    c = torch.tensor([[1.0, 0, 0, 1, 0]])
    targets = S.target_labels(c, names, True, combo=True)
    titles = S.target_names(names, True, combo=True)
    assert titles == ["Black", "Blond", "Brown", "±Male", "±Young", "Black ±all"]
    assert len(titles) == len(targets)
    assert targets[1][0].tolist() == [0, 1, 0, 1, 0]  # "Blond": that hair colour set
    assert targets[3][0].tolist() == [1, 0, 0, 0, 0]  # "±Male": flipped
    assert S.target_names(["cat", "dog"], False) == ["cat", "dog"]  # domains: set, not flipped

"""Tests for 03_bicyclegan_latent.py (BicycleGAN). CPU only, small widths except the param counts."""
import json
import re
import signal

import pytest
import torch
from PIL import Image

from conftest import (console_lines, load_script, stop_with_signal, summary_files,
                      widest_console_line, write_unreadable)

bg = load_script("03_bicyclegan_latent")
SMALL = dict(ngf=8, nef=8, ndf=8, img_size=64, batch=2, num_workers=0, amp=False)


def small_cfg(**kw):
    return bg.Config(**{**SMALL, **kw})


def params(net):
    return {k: p.detach().clone() for k, p in net.named_parameters()}


def changed(before, net):
    return [k for k, p in net.named_parameters() if not torch.equal(before[k], p)]


@pytest.mark.parametrize("where_add", ["all", "input"])
@pytest.mark.parametrize("size,batch", [(64, 2), (128, 4)])
def test_shapes(where_add, size, batch):
    cfg = small_cfg(img_size=size, where_add=where_add, batch=batch)
    nets = bg.build_nets(cfg, torch.device("cpu"))
    A = torch.rand(batch, 1, size, size) * 2 - 1
    B = torch.rand(batch, 3, size, size) * 2 - 1
    z = torch.randn(batch, cfg.nz)
    x = nets.G(A, z)
    assert x.shape == (batch, 3, size, size) and x.abs().max() <= 1
    mu, logvar = nets.E(B)
    assert mu.shape == logvar.shape == (batch, cfg.nz)
    n = {64: (6, 2), 128: (14, 6)}[size]  # 30 and 14 at 256 px
    assert [tuple(p.shape) for p in nets.D(B)] == [(batch, 1, n[0], n[0]), (batch, 1, n[1], n[1])]
    # z matters: a different code gives a different output (dropout off)
    nets.G.eval()
    assert (nets.G(A, z) - nets.G(A, torch.randn_like(z))).abs().max() > 0
    fw = bg.forward(nets, A, B, cfg.nz)  # half encoded, half random
    assert fw["x_enc"].shape == fw["x_rand"].shape == (batch // 2, 3, size, size)
    assert torch.equal(fw["B_rand"], B[batch // 2:])


def test_param_counts():
    with torch.device("meta"):  # count without allocating or running
        count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
        assert count(bg.Generator(1, 3, 8, 64, 256, "all")) == 54_792_579
        assert count(bg.Generator(1, 3, 8, 64, 256, "input")) == 54_415_747
        assert count(bg.Encoder(3, 8, 64, 256)) == 2_590_032
        assert count(bg.MultiScaleD(3, 64)) == 3_458_978
    G = bg.Generator(1, 3, 8, 8, 256)
    n_drop = sum(isinstance(m, torch.nn.Dropout) for m in G.modules())
    n_in = sum(isinstance(m, torch.nn.InstanceNorm2d) and not m.affine for m in G.modules())
    assert n_drop == 3 and n_in == 13  # dropout in levels 4-6; IN: 6 down + 7 up, no affine


def test_losses_values_and_signs():
    zeros = torch.zeros(2, 8)
    assert bg.kl_loss(zeros, zeros).item() == 0.0  # exactly 0 at the prior
    assert bg.kl_loss(torch.ones(2, 8), zeros).item() == pytest.approx(8.0)  # a sum, 0.5 * 16
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    assert bg.kl_loss(mu, logvar).item() > 0
    assert bg.kl_loss(zeros, torch.full((2, 8), 0.5)).item() > 0  # wrong variance costs too
    preds = [torch.ones(2, 1, 6, 6), torch.ones(2, 1, 2, 2)]
    assert bg.lsgan_loss(preds, 1.0).item() == 0.0
    assert bg.lsgan_loss(preds, 0.0).item() == pytest.approx(2.0)  # summed over the 2 scales
    assert bg.l1_loss(torch.zeros(3), torch.full((3,), -2.0)).item() == pytest.approx(2.0)


def test_latent_l1_gives_E_no_gradient():
    cfg = small_cfg()
    torch.manual_seed(1)
    nets = bg.build_nets(cfg, torch.device("cpu"))
    A, B = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    loss = bg.ge_losses(nets, bg.forward(nets, A, B, cfg.nz), cfg)
    sum(v for k, v in loss.items() if k != "z_L1").backward(retain_graph=True)
    g_E = {k: p.grad.clone() for k, p in nets.E.named_parameters()}
    g_G = {k: p.grad.clone() for k, p in nets.G.named_parameters()}
    assert any(g.abs().max() > 0 for g in g_E.values())  # L1 and KL do train E
    loss["z_L1"].backward()
    assert all(torch.equal(g_E[k], p.grad) for k, p in nets.E.named_parameters())
    assert max((g_G[k] - p.grad).abs().max() for k, p in nets.G.named_parameters()) > 0
    for D in (nets.D, nets.D2):  # frozen during the G/E losses
        assert all(p.grad is None for p in D.parameters())


def test_steps_change_only_their_nets():
    cfg = small_cfg()
    dev = torch.device("cpu")
    nets = bg.build_nets(cfg, dev)
    opts = bg.build_optims(nets, cfg)
    A, B = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    fw = bg.forward(nets, A, B, cfg.nz)
    before = {k: params(n) for k, n in vars(nets).items()}
    bg.g_step(nets, opts, fw, cfg)
    assert changed(before["G"], nets.G) and changed(before["E"], nets.E)
    assert not changed(before["D"], nets.D) and not changed(before["D2"], nets.D2)
    before = {k: params(n) for k, n in vars(nets).items()}
    bg.d_step(nets.D2, opts["D2"], fw["B_rand"], fw["x_rand"])
    assert changed(before["D2"], nets.D2)
    assert not any(changed(before[k], getattr(nets, k)) for k in ("G", "E", "D"))
    bg.d_step(nets.D, opts["D"], fw["B_enc"], fw["x_enc"])
    assert changed(before["D"], nets.D) and not changed(before["G"], nets.G)


class KnownD(torch.nn.Module):
    """Two 'scales' that both predict w · mean(x) for each image (w starts at 1)."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        p = self.w * x.mean((1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        return [p.expand(-1, 1, 4, 4), p.expand(-1, 1, 2, 2)]


def test_d_step_on_known_predictions():
    """LSGAN's D side: Σ_scales mean (D(fake) − 0)² + mean (D(real) − 1)², fake detached. With
    D(real) = 0.8 and D(fake) = 0.3: 2 · (0.3² + 0.2²); its gradient in w, 2·2·0.3·0.3 +
    2·2·0.8·(0.8 − 1) = −0.28, moves w up (SGD, lr 0.1): real up, fake too but less."""
    D = KnownD()
    real, fake = torch.full((2, 3, 8, 8), 0.8), torch.full((2, 3, 8, 8), 0.3).requires_grad_()
    loss = bg.d_step(D, torch.optim.SGD(D.parameters(), lr=0.1), real, fake)
    assert loss.item() == pytest.approx(2 * (0.3 ** 2 + 0.2 ** 2))
    assert D.w.item() == pytest.approx(1 + 0.1 * 0.28) and fake.grad is None


def test_ge_losses_are_weighted():
    """Eq. (9): the terms G and E minimise, each with its own λ (λs ≠ 1 so a dropped one shows)."""
    cfg = small_cfg(lambda_l1=2.0, lambda_kl=3.0, lambda_z=5.0)
    nets = bg.build_nets(cfg, torch.device("cpu"))
    A, B = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    fw = bg.forward(nets, A, B, cfg.nz)
    # E's μ and log σ² start near 0, where KL is 0 to rounding (and a dropped λ_KL hides): set μ 1
    fw["mu"] = torch.ones_like(fw["mu"]) + 0 * fw["mu"]  # KL = Σ μ²/2 = numel / 2
    loss = bg.ge_losses(nets, fw, cfg)
    assert loss["kl"].item() == pytest.approx(3.0 * fw["mu"].numel() / 2)
    want = dict(G_GAN=bg.lsgan_loss(nets.D(fw["x_enc"]), 1.0),  # cVAE-GAN's fakes, D
                G_GAN2=bg.lsgan_loss(nets.D2(fw["x_rand"]), 1.0),  # cLR-GAN's fakes, D2
                G_L1=2.0 * bg.l1_loss(fw["x_enc"], fw["B_enc"]),
                kl=3.0 * bg.kl_loss(fw["mu"], fw["logvar"]),
                z_L1=5.0 * bg.l1_loss(nets.E(fw["x_rand"])[0], fw["z_rand"]))
    assert loss.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(loss[k], want[k], msg=k)


def test_train_step_feeds_each_D_its_own_pair(monkeypatch):
    """Official order: one forward, the G/E step, then D on (B_enc, x_enc), the cVAE-GAN's pair,
    and D2 on (B_rand, x_rand), the cLR-GAN's; the logged D and D2 are their losses."""
    cfg = small_cfg(batch=4)
    dev = torch.device("cpu")
    nets = bg.build_nets(cfg, dev)
    opts = bg.build_optims(nets, cfg)
    fws, calls, forward, d_step = [], [], bg.forward, bg.d_step

    def spy_forward(*a):
        fws.append(forward(*a))
        return fws[-1]

    def spy_d_step(D, opt_D, real, fake):
        calls.append((D, opt_D, real, fake))
        return d_step(D, opt_D, real, fake)
    monkeypatch.setattr(bg, "forward", spy_forward)
    monkeypatch.setattr(bg, "d_step", spy_d_step)
    A, B = torch.rand(4, 1, 64, 64) * 2 - 1, torch.rand(4, 3, 64, 64) * 2 - 1
    losses = bg.train_step(nets, opts, A, B, cfg, dev)
    (fw,), (D, opt_D, real, fake), (D2, opt_D2, real2, fake2) = fws, *calls
    assert D is nets.D and opt_D is opts["D"] and real is fw["B_enc"] and fake is fw["x_enc"]
    assert D2 is nets.D2 and opt_D2 is opts["D2"] and real2 is fw["B_rand"] and \
        fake2 is fw["x_rand"]
    assert {"G_GAN", "G_GAN2", "G_L1", "kl", "z_L1", "D", "D2"} == losses.keys()


def test_lr_schedule():
    cfg = small_cfg(total_iters=100, lr=2e-4)
    lrs = [bg.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == lrs[48] == 2e-4  # constant in the first half
    assert all(a > b for a, b in zip(lrs[49:], lrs[50:]))  # then strictly decreasing
    assert 0 < lrs[-1] < 2e-4 / 40  # towards 0, never exactly 0 (as official)


def test_edge_map():
    flat = torch.full((2, 3, 32, 32), 0.3)
    A = bg.edge_map(flat)
    assert A.shape == (2, 1, 32, 32) and torch.equal(A, torch.ones_like(A))  # no edges
    x = torch.full((1, 3, 32, 32), -0.8)
    x[:, :, 8:24, 8:24] = 0.9  # a bright square
    A = bg.edge_map(x)
    assert set(A.unique().tolist()) <= {-1.0, 1.0}
    assert (A[0, 0, 8:24, 7:9] == -1).float().mean() > 0.9  # the left border is a line
    assert (A[0, 0, 12:20, 12:20] == 1).all() and (A[0, 0, :4] == 1).all()  # flat parts are not


def test_toy_A_is_the_filled_silhouette():
    import random
    from data import toy
    x = toy.render_shape("square", 64, random.Random(0))[0][None] * 2 - 1  # (1, 3, 64, 64)
    A, B = bg.to_pair(x, small_cfg(), "cpu")
    assert torch.equal(B, x) and A.shape == (1, 1, 64, 64)
    f = toy.read_shapes(x)  # the oracle's object: its centre and size (sqrt of the area)
    assert (A == -1).float().mean().sqrt() == pytest.approx(f["size"].item(), abs=1e-6)
    cy, cx = int(f["cy"] * 64), int(f["cx"] * 64)
    assert A[0, 0, cy, cx] == -1 and A[0, 0, 0, 0] == 1  # the interior is filled, not an outline
    A_photo, _ = bg.to_pair(x, small_cfg(data="data/afhq"), "cpu")  # other data: Sobel edges
    assert torch.equal(A_photo, bg.edge_map(x)) and (A_photo == 1).sum() > (A == 1).sum()


def test_oracle_reads_the_encoded_colour():
    import random
    from data import toy
    rng = random.Random(0)
    B = torch.stack([toy.render_shape(toy.SHAPES[i % 3], 64, rng)[0] for i in range(6)]) * 2 - 1
    x = B[:, None].expand(-1, 4, -1, -1, -1)  # every z gives B itself: no colour from z
    s = bg.oracle_scores(x, B, B)  # the encoded path returns B: its colour exactly
    assert s["valid"] == 1 and s["shape_kept"] == 1 and s["color_std_over_z"] == 0
    assert s["color_err_enc"] == 0 and s["color_err_rand"] == 0
    other = B.roll(1, 0)  # each input gets another image's colour (same shape is not needed)
    s = bg.oracle_scores(other[:, None].expand(-1, 4, -1, -1, -1), B, other)
    assert s["color_err_enc"] == pytest.approx(s["color_err_rand"]) and s["color_err_enc"] > 0.05
    line = bg.oracle_lines(s)[1]
    assert f"colour error vs B {s['color_err_enc']:.3f}" in line and "random z" in line
    blank = torch.zeros_like(B)  # step 0: nothing readable, so no colour to compare
    s = bg.oracle_scores(blank[:, None].expand(-1, 4, -1, -1, -1), B, blank)
    assert s["valid"] == 0 and "nan" not in " ".join(bg.oracle_lines(s))
    assert "colour error vs B - (no readable output) (random z: -" in bg.oracle_lines(s)[1]


def test_aligned_reader(tmp_path):
    (tmp_path / "train").mkdir()
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste(Image.new("RGB", (64, 64), (0, 0, 255)), (64, 0))  # A = red | B = blue
    for i in range(2):
        img.save(tmp_path / "train" / f"{i}.png")
    cfg = small_cfg(data=str(tmp_path))
    ds = bg.build_dataset(cfg, "train")
    A, B = ds[0]
    assert A.shape == (1, 64, 64) and B.shape == (3, 64, 64)
    assert A.mean().item() == pytest.approx(0.299 * 2 - 1, abs=0.01)  # grayscale of pure red
    assert B[2].min().item() == pytest.approx(1.0) and B[:2].max().item() == pytest.approx(-1.0)
    a, b = bg.to_pair([A[None], B[None]], cfg, torch.device("cpu"))
    assert torch.equal(a, A[None]) and torch.equal(b, B[None])  # A comes from the file, not edges


def write_pairs(folder, n, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste(Image.new("RGB", (64, 64), (0, 0, 255)), (64, 0))  # A = red | B = blue
    for i in range(n):
        img.save(folder / f"{i + 1}{suffix}", format="JPEG" if "j" in suffix.lower() else "PNG")


@pytest.mark.parametrize("suffix", [".jpeg", ".PNG", ".JPG"])
def test_pairs_with_any_image_suffix_are_pairs(tmp_path, suffix):
    write_pairs(tmp_path / "train", 2, suffix)
    ds = bg.build_dataset(small_cfg(data=str(tmp_path)), "train")
    assert isinstance(ds, bg.AlignedPairs) and len(ds) == 2
    A, B = ds[0]
    assert A.shape == (1, 64, 64) and B[2].mean() > 0.9  # B is the blue right half


@pytest.mark.parametrize("paired", [True, False])
def test_unreadable_first_file_is_skipped(tmp_path, capsys, paired):
    if paired:
        write_pairs(tmp_path / "train", 3)
    else:  # plain photos: A is their edge map
        (tmp_path / "train").mkdir()
        for i in range(3):
            Image.new("RGB", (64, 64), (90 * i, 0, 0)).save(tmp_path / "train" / f"{i + 1}.png")
    write_unreadable(tmp_path / "train" / "0.png", "random")  # sorts first
    ds = bg.build_dataset(small_cfg(data=str(tmp_path)), "train")
    assert isinstance(ds, bg.AlignedPairs) == paired and len(ds) == 4
    assert all(torch.isfinite(t).all() for i in range(4) for t in (ds[i] if paired else [ds[i]]))
    assert capsys.readouterr().err.count("0.png: cannot read") == 1 and ds.n_skipped == 1


def read_log(path):
    return {d["step"]: d for d in map(json.loads, path.read_text().splitlines())}


def test_resume_gives_identical_next_losses(tmp_path, monkeypatch):
    argv = ["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "2", "--total-iters", "3",
            "--log-every", "1", "--save-every", "100", "--sample-every", "100"]
    bg.main(argv + ["--out", str(tmp_path / "full")])
    real_step, calls = bg.train_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during step 3: last.pt holds step 2
        return real_step(*a, **kw)

    monkeypatch.setattr(bg, "train_step", interrupted)
    bg.main(argv + ["--out", str(tmp_path / "cut")])
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(bg, "train_step", real_step)
    bg.main(argv + ["--out", str(tmp_path / "cut"), "--resume", "auto"])
    full, cut = read_log(tmp_path / "full" / "log.jsonl"), read_log(tmp_path / "cut" / "log.jsonl")
    for k in ("G_GAN", "G_GAN2", "G_L1", "kl", "z_L1", "D", "D2"):
        assert cut[3][k] == pytest.approx(full[3][k], rel=1e-6, abs=1e-9), k
    with pytest.raises(bg.UserError):  # an existing run is never silently overwritten
        bg.main(argv + ["--out", str(tmp_path / "cut")])


def test_short_toy_run(tmp_path, capsys):
    out = tmp_path / "toy"
    argv = ["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "4", "--total-iters", "12",
            "--log-every", "4", "--out", str(out)]
    bg.main(argv)
    text = capsys.readouterr().out
    assert len(console_lines(text)) == 3 and all(len(ln) <= 120 for ln in console_lines(text))
    files = summary_files(text)  # the summary names what the run wrote
    assert [p.name for p in files["samples"]] == ["0000012.png"]
    assert [p.name for p in files["loss curves"]] == ["losses.png"]
    assert all(p.is_file() for ps in files.values() for p in ps)
    assert "oracle      valid " in text and "colour std over z" in text
    log = read_log(out / "log.jsonl")
    assert all(torch.isfinite(torch.tensor(list(d.values()))).all() for d in log.values())
    assert log[12]["D"] < log[4]["D"] and log[12]["D2"] < log[4]["D2"]  # both Ds learn
    # The last step (11) lies in the decay (12 steps: constant for 6, then 1 - k/7): the lr used,
    # kept in the optimizers, is the one logged.
    state = torch.load(out / "last.pt", weights_only=True)
    cfg = bg.Config(**state["config"])
    lr = bg.lr_at(11, cfg)
    assert lr == pytest.approx(cfg.lr / 7) and log[12]["lr"] == pytest.approx(lr)
    assert all(g["lr"] == pytest.approx(lr) for o in state["opts"].values()
               for g in o["param_groups"])
    assert (out / "last.pt").exists() and (out / "samples" / "0000012.png").exists()
    with Image.open(out / "samples" / "0000012.png") as grid:  # 4 rows of 3 + 5 images
        assert grid.width / (grid.height - 18) == pytest.approx(8 / 4, rel=0.05)  # + titles
        assert grid.convert("L").crop((0, 0, grid.width, 18)).getextrema()[0] < 128  # some text
    bg.main(["sample", "--out", str(out)])
    assert (out / "sample_grid.png").exists() and (out / "z_interp.gif").exists()
    from data.metrics import LPIPS
    res = bg.evaluate(small_cfg(out=str(out)), "", n_inputs=3, n_z=4,
                      lpips=LPIPS(pretrained=False))
    assert res["n_inputs"] == 3 and res["lpips_diversity"] > 0 and res["l1_rec"] > 0
    assert {"valid", "shape_kept", "pos_err", "color_err_enc"} <= res.keys()  # the oracle ran
    assert res["color_std_real"] > 0.05  # toy colours vary


# ---------------------------------------------------------------------------- faults
RUN = ["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "2", "--sample-every", "100"]


def test_nan_stops_the_run_at_the_next_log_step(tmp_path, monkeypatch):
    real, calls = bg.train_step, []

    def broken(nets, *a, **kw):  # the update of step 1 leaves D non-finite (as with lr 1e10)
        calls.append(1)
        losses = real(nets, *a, **kw)
        with torch.no_grad():
            next(nets.D.parameters()).fill_(float("nan"))
        return losses
    monkeypatch.setattr(bg, "train_step", broken)
    with pytest.raises(bg.UserError, match=r"step 2: loss term '\w+' is nan; stopping without"):
        bg.main(RUN + ["--out", str(tmp_path), "--total-iters", "8", "--log-every", "1",
                       "--save-every", "100"])
    assert len(calls) == 2 and not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    (["--log-every", "0"], "--log-every 0: must be ≥ 1")])
def test_bad_flags_are_one_line_errors(flags, msg, tmp_path):
    with pytest.raises(bg.UserError, match=re.escape(msg)):
        bg.main(flags + ["--out", str(tmp_path)])


@pytest.mark.parametrize("kind", ["empty", "truncated", "another script's"])
def test_sample_with_a_bad_checkpoint_names_the_file(kind, tmp_path):
    path = tmp_path / "x.pt"
    cfg = load_script("04_stylegan_mapping").Config() if kind == "another script's" else small_cfg()
    bg.save_checkpoint(path, 1, cfg, {"G": torch.nn.Linear(2, 2)}, {})
    cut = {"empty": b"", "truncated": path.read_bytes()[:900]}
    path.write_bytes(cut.get(kind, path.read_bytes()))
    for mode in ("sample", "eval"):
        with pytest.raises(bg.UserError, match=re.escape(str(path)) + ": (cannot read this "
                                               "checkpoint|not a checkpoint of this script)"):
            bg.main([mode, "--ckpt", str(path)])


def test_console_line_fits_120_columns():
    keys = ["G_GAN", "G_GAN2", "G_L1", "kl", "z_L1", "D", "D2", "lr"]
    line = widest_console_line(bg.CONSOLE, keys, bg.Config().total_iters)
    assert " GE -0.0615 " in line  # the five weighted terms G and E minimise


# ---------------------------------------------------------------------------- a cluster stops it
def test_stop_signal_saves_and_says_how_to_continue(tmp_path):
    """SIGUSR1, SLURM's warning before the time limit (sbatch --signal=USR1@s), saves like
    Ctrl-C: last.pt at the step reported, the log up to it, exit status 128 + signal number, and
    the command that continues the run."""
    out, flags = tmp_path / "run", ["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "2"]
    flags += ["--num-workers", "0", "--log-every", "1", "--save-every", "100000", "--sample-every",
              "100000", "--total-iters", "100000", "--out", str(out)]
    rc, text, err = stop_with_signal(["03_bicyclegan_latent.py", *flags], signal.SIGUSR1)
    assert rc == 128 + signal.SIGUSR1, err[-3000:]
    step = int(re.search(r"stopped by SIGUSR1 at step (\d+)", text)[1])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step >= 1
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    assert f"python 03_bicyclegan_latent.py {' '.join(flags)} --resume auto" in text

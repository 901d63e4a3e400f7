"""Tests for 04_stylegan_mapping.py (StyleGAN v1: mapping network, AdaIN, noise, mixing, truncation).
Small widths and 8-16 px images keep them CPU-fast; the parameter-count test builds full-size nets
without running them."""
import copy
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import (ROOT, build_all, console_lines, load_script, stop_with_signal,
                      summary_files, widest_console_line, write_unreadable)
from PIL import Image

import common
from data import metrics

m = load_script("04_stylegan_mapping")
TINY = dict(img_size=16, w_dim=16, fmap_base=64, fmap_max=16, batch=4, amp=False)
TINY_FLAGS = ["--img-size", "16", "--w-dim", "16", "--fmap-base", "64", "--fmap-max", "16",
              "--batch", "4", "--num-workers", "0"]


def tiny_cfg(**kw):
    return dataclasses.replace(m.Config(), **{**TINY, **kw})


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def changed(before, net):
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


@pytest.fixture
def image_folder(tmp_path):
    """8 random RGB PNGs in a nested folder: any folder of images is a dataset (StyleGAN)."""
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i in range(8):
        img = torch.randint(0, 256, (24, 20, 3), dtype=torch.uint8)
        Image.frombytes("RGB", (20, 24), bytes(img.flatten().tolist())).save(folder / f"{i}.png")
    return tmp_path / "imgs"


def test_shapes():
    for R, B in ((8, 2), (16, 4)):
        cfg = tiny_cfg(img_size=R)
        G, D = m.Generator(cfg), m.Discriminator(R, cfg.fmap_base, cfg.fmap_max)
        L = G.synthesis.num_layers
        assert L == 2 * int(math.log2(R)) - 2
        z = torch.randn(B, cfg.w_dim)
        assert G.mapping(z).shape == (B, cfg.w_dim)
        assert G.styles(z, 0.7, 8).shape == (B, L, cfg.w_dim)
        x = G(z)
        assert x.shape == (B, 3, R, R)
        assert D(x).shape == (B,)
        assert [n.shape[-1] for n in G.synthesis.make_noise(1, "cpu")] == [4 << i // 2 for i in range(L)]


def test_param_counts():
    cfg = m.Config(img_size=1024)
    G = m.Generator(cfg)
    assert n_params(G.mapping) == 2_101_248  # 8 × (512·512 + 512)
    # Official Gs (NVlabs README) 26,219,627 also holds the to-RGB of 4..512 px for growing.
    lower_rgb = sum(c * 3 + 3 for c in (512, 512, 512, 512, 256, 128, 64, 32))
    assert n_params(G) == 26_212_019 == 26_219_627 - lower_rgb
    assert n_params(m.Discriminator(1024, 8192, 512)) == 23_077_137
    # 256 px = rosinality's active G at 256 (26,078,403) + the official bias after the constant
    assert n_params(m.Generator(m.Config(img_size=256))) == 26_078_403 + 512
    assert G.synthesis.num_layers == 18 and m.Discriminator(256, 8192, 512).from_rgb.weight.shape[0] == 64


def test_equalized_lr_scales_at_runtime():
    torch.manual_seed(0)
    lin, conv = m.EqualLR(512, 512), m.EqualLR(64, 32, 3)
    for layer, fan_in in ((lin, 512), (conv, 64 * 9)):
        w = layer.weight
        assert abs(w.std().item() - 1) < 0.02 and abs(w.mean().item()) < 0.02  # stored ~N(0, 1)
        assert layer.scale == pytest.approx(math.sqrt(2 / fan_in))
    x = torch.randn(3, 512)
    torch.testing.assert_close(lin(x), x @ (lin.weight * math.sqrt(2 / 512)).T + lin.bias)
    y = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(conv(y), F.conv2d(y, conv.weight * math.sqrt(2 / 576), conv.bias,
                                                 padding=1))
    # the effective weight, not the stored one, has He's std: activations keep their scale
    assert abs(lin(torch.randn(4096, 512)).std().item() - math.sqrt(2)) < 0.1


def test_pixel_norm_unit_mean_square():
    z = torch.randn(5, 64) * torch.tensor([0.1, 1, 3, 100, 1e4])[:, None]
    torch.testing.assert_close(m.pixel_norm(z).pow(2).mean(1), torch.ones(5))


def test_adain_output_has_style_statistics():
    torch.manual_seed(0)
    adain = m.AdaIN(8, 16)
    x = torch.randn(3, 8, 6, 6) * 5 + 2
    w = torch.randn(3, 16)
    y_s, y_b = adain.affine(w).chunk(2, dim=1)  # (3, 8) each
    out = adain(x, w)
    torch.testing.assert_close(out.mean((2, 3)), y_b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.std((2, 3), unbiased=False), y_s.abs(), atol=1e-4, rtol=1e-4)
    # at init y_s ≈ 1 + small and the bias of y_s is exactly 1
    assert torch.equal(adain.affine.bias[:8], torch.ones(8)) and torch.equal(adain.affine.bias[8:],
                                                                            torch.zeros(8))


def test_noise_scale_starts_at_zero_then_matters():
    cfg = tiny_cfg()
    G, D, _, opt_G, _ = build_all(m, cfg, torch.device("cpu"))
    assert all(torch.equal(layer.noise_scale, torch.zeros_like(layer.noise_scale))
               for layer in G.synthesis.layers)
    z = torch.randn(2, cfg.w_dim)
    torch.testing.assert_close(G(z), G(z), rtol=0, atol=0)  # fresh noise, no effect at init
    m.g_step(G, D, opt_G, cfg.batch, cfg, torch.device("cpu"))
    assert all(layer.noise_scale.abs().min() > 0 for layer in G.synthesis.layers)
    assert (G(z) - G(z)).abs().max() > 1e-6  # now two noise draws give different images


def test_style_mixing_uses_two_ws_across_crossover():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    G = m.Generator(cfg)
    L = G.synthesis.num_layers
    ws1, ws2 = torch.randn(2, L, 4), torch.randn(2, L, 4)
    mixed = m.style_mix(ws1, ws2, 2)
    assert torch.equal(mixed[:, :2], ws1[:, :2]) and torch.equal(mixed[:, 2:], ws2[:, 2:])
    crossovers, cpu = set(), torch.device("cpu")
    for _ in range(20):  # the step's draws: z, then (p = 1) z2 and the crossover
        z, z2, crossover, _ = m.draw_latents(G, 3, tiny_cfg(mixing_prob=1.0), cpu)
        ws, w = G.mixed_styles(z, z2, crossover)
        first = (ws == w[:, None]).all(-1).all(0)  # (L,) layers that use f(z)
        c = int(first.sum())
        assert c == crossover and 1 <= c < L and first[:c].all() and not first[c:].any()
        assert torch.equal(ws[:, c:], G.mapping(z2)[:, None].expand(-1, L - c, -1))  # then f(z2)
        crossovers.add(c)
    assert len(crossovers) > 1  # the crossover layer is random
    z, z2, crossover, _ = m.draw_latents(G, 3, tiny_cfg(mixing_prob=0.0), cpu)
    assert z2 is None and crossover is None
    ws, w = G.mixed_styles(z)
    assert torch.equal(ws, w[:, None].expand_as(ws))


def test_truncation_psi_0_gives_w_avg_and_psi_1_gives_w():
    cfg = tiny_cfg()
    G = m.Generator(cfg)
    G.w_avg.copy_(torch.randn(cfg.w_dim))
    z = torch.randn(3, cfg.w_dim)
    ws = G.styles(z)
    assert torch.equal(G.styles(z, psi=1.0, cutoff=4), ws)
    assert torch.equal(G.styles(z, psi=0.0), G.w_avg.expand_as(ws))  # every layer → w̄ exactly
    cut = G.styles(z, psi=0.0, cutoff=4)
    assert torch.equal(cut[:, :4], G.w_avg.expand(3, 4, -1)) and torch.equal(cut[:, 4:], ws[:, 4:])
    half = G.styles(z, psi=0.5)
    torch.testing.assert_close(half, G.w_avg + 0.5 * (ws - G.w_avg))


def test_losses_signs_and_r1():
    hi, lo = torch.full((4,), 5.0), torch.full((4,), -5.0)
    assert m.d_logistic(hi, lo) < 0.02 < m.d_logistic(lo, hi)  # D wants real high, fake low
    assert m.g_nonsaturating(hi) < 0.01 < m.g_nonsaturating(lo)  # G wants D(G(z)) high
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    r1 = m.r1_reg((x * a).sum((1, 2, 3)), x)  # linear D: ∇_x D = a for every sample
    torch.testing.assert_close(r1, a.pow(2).sum())


def test_minibatch_stddev_groups_of_four(tmp_path):
    x = torch.randn(8, 3, 2, 2)
    out = m.minibatch_stddev(x)
    assert out.shape == (8, 4, 2, 2)
    group0 = x[[0, 2, 4, 6]]  # (G=4, M=2): sample b is in group b mod 2
    expect = (group0.var(0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(out[0, 3], expect.expand(2, 2))
    torch.testing.assert_close(out[6, 3], expect.expand(2, 2))
    with pytest.raises(ValueError, match="batch 6: not a multiple of the minibatch-stddev group"):
        m.minibatch_stddev(torch.randn(6, 3, 2, 2))
    with pytest.raises(common.UserError, match="--batch 6: .* multiple of 4"):  # before any step
        m.main(["--batch", "6", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_steps_change_only_their_nets():
    cfg = tiny_cfg()
    dev = torch.device("cpu")
    G, D, G_ema, opt_G, opt_D = build_all(m, cfg, dev)
    assert opt_G.param_groups[1]["lr"] == pytest.approx(cfg.lr * 0.01)  # the mapping's ×0.01
    assert {id(p) for p in opt_G.param_groups[1]["params"]} == {id(p) for p in G.mapping.parameters()}
    g0, d0 = snapshot(G), snapshot(D)
    losses = m.d_step(G, D, opt_D, torch.rand(4, 3, 16, 16) * 2 - 1, cfg)
    assert changed(g0, G) == set() and changed(d0, D) == set(D.state_dict())
    assert losses["D/adv"] > 0
    d1 = snapshot(D)
    opt_D.zero_grad(set_to_none=True)
    losses = m.g_step(G, D, opt_G, 4, cfg, dev)
    assert changed(d1, D) == set() and all(p.grad is None for p in D.parameters())
    moved = changed(g0, G)
    assert "w_avg" in moved and any(k.startswith("mapping.") for k in moved)
    assert any(k.startswith("synthesis.") for k in moved) and losses["G/adv"] > 0
    e0 = snapshot(G_ema)
    m.ema_update(G_ema, G, cfg)
    beta = 0.5 ** (cfg.batch / 10_000)
    k = "synthesis.to_rgb.weight"
    torch.testing.assert_close(G_ema.state_dict()[k], beta * e0[k] + (1 - beta) * G.state_dict()[k])
    assert torch.equal(G_ema.w_avg, G.w_avg)


def flat_grad(net):  # a parameter without a gradient (R1 ignores D's last bias) counts as 0
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                      for p in net.parameters()])


def test_d_step_gradient_is_logistic_plus_half_gamma_r1():
    """App. C: D minimises the logistic loss + γ/2 · R1 on reals. From γ = 0 to γ = 4 the gradient
    d_step leaves in D (same weights and draws) moves by 2 ∇R1, R1 = E‖∇_x D(x)‖² found here."""
    dev = torch.device("cpu")
    G, D0, _, _, _ = build_all(m, tiny_cfg(), dev)
    x = torch.rand(4, 3, 16, 16) * 2 - 1

    def d_step(gamma):
        D = copy.deepcopy(D0)
        torch.manual_seed(0)  # the fakes' latents, mixing and noise
        logs = m.d_step(G, D, torch.optim.Adam(D.parameters()), x, tiny_cfg(r1_gamma=gamma))
        return flat_grad(D), logs

    (g0, _), (g4, logs) = d_step(0.0), d_step(4.0)
    D, x_real = copy.deepcopy(D0), x.clone().requires_grad_()
    grad_x, = torch.autograd.grad(D(x_real).sum(), x_real, create_graph=True)
    r1 = grad_x.pow(2).sum((1, 2, 3)).mean()
    r1.backward()
    torch.testing.assert_close(logs["D/r1"], r1.detach())
    assert flat_grad(D).norm() > 1e-3 * g0.norm()  # R1's gradient is not lost in rounding
    torch.testing.assert_close(g4 - g0, 2.0 * flat_grad(D), rtol=1e-3, atol=1e-4 * g0.abs().max())


def test_g_step_w_avg_and_ema_with_non_default_betas():
    """w̄ ← β_w w̄ + (1 − β_w) mean f(z) over the step's z (β_w 0.8), and the EMA of G with a
    0.008 k-image half-life, β = 0.5^(4/8): β θ_ema + (1 − β) θ for every parameter, w̄ copied."""
    cfg, dev = tiny_cfg(w_avg_beta=0.8, ema_kimg=0.008), torch.device("cpu")
    G, D, G_ema, opt_G, _ = build_all(m, cfg, dev)
    with torch.no_grad():  # apart, so that the direction of each lerp shows
        G.w_avg.normal_()
        for p in G_ema.parameters():
            p.add_(torch.randn_like(p))
    w_avg0, G0 = G.w_avg.clone(), copy.deepcopy(G)
    torch.manual_seed(0)
    z, z2, crossover, _ = m.draw_latents(G0, cfg.batch, cfg, dev)  # what g_step draws
    _, w = G0.mixed_styles(z, z2, crossover)
    torch.manual_seed(0)
    m.g_step(G, D, opt_G, cfg.batch, cfg, dev)
    torch.testing.assert_close(G.w_avg, 0.8 * w_avg0 + 0.2 * w.mean(0))
    before, beta = [p.clone() for p in G_ema.parameters()], 0.5 ** (4 / 8)
    m.ema_update(G_ema, G, cfg)
    for old, p, q in zip(before, G_ema.parameters(), G.parameters()):
        torch.testing.assert_close(p, beta * old + (1 - beta) * q)
    assert torch.equal(G_ema.w_avg, G.w_avg)


def test_resume_gives_identical_next_losses(tmp_path):
    cfg = tiny_cfg()
    dev = torch.device("cpu")
    x = torch.rand(4, 3, 16, 16) * 2 - 1

    def step(nets):
        G, D, G_ema, opt_G, opt_D = nets
        out = m.d_step(G, D, opt_D, x, cfg) | m.g_step(G, D, opt_G, 4, cfg, dev)
        m.ema_update(G_ema, G, cfg)
        return {k: v.item() for k, v in out.items()}

    torch.manual_seed(1)
    nets = build_all(m, cfg, dev)
    step(nets)
    named = lambda n: ({"G": n[0], "D": n[1], "G_ema": n[2]}, {"G": n[3], "D": n[4]})  # noqa: E731
    common.save_checkpoint(tmp_path / "last.pt", 1, cfg, *named(nets))
    expected = [step(nets) for _ in range(2)]
    torch.manual_seed(123)  # a different RNG state and fresh weights: all must come from the file
    fresh = build_all(m, cfg, dev)
    assert common.load_checkpoint(tmp_path / "last.pt", *named(fresh))["step"] == 1
    assert [step(fresh) for _ in range(2)] == expected


def test_train_resume_is_exact_and_bad_input(image_folder, tmp_path, capsys):
    def run(out, *extra):
        m.main(["--data", str(image_folder), "--out", str(tmp_path / out), *TINY_FLAGS,
                "--log-every", "1", "--save-every", "2", "--sample-every", "2", *extra])
        return torch.load(tmp_path / out / "last.pt", weights_only=True)

    straight = run("a", "--total-iters", "4")  # 8 images / batch 4: the resume crosses an epoch
    assert run("b", "--total-iters", "2")["step"] == 2
    with pytest.raises(common.UserError, match="--resume auto"):
        run("b", "--total-iters", "3")  # never silently overwrite a run
    resumed = run("b", "--total-iters", "4", "--resume", "auto")
    assert resumed["step"] == 4 and set(resumed["nets"]) == {"G", "D", "G_ema"}
    w_avg = straight["nets"]["G"]["w_avg"]  # train() updates the EMA, which copies w̄
    assert w_avg.abs().sum() > 0 and torch.equal(straight["nets"]["G_ema"]["w_avg"], w_avg)
    for net in ("G", "D", "G_ema"):
        for k, v in straight["nets"][net].items():
            assert torch.equal(v, resumed["nets"][net][k]), (net, k)
    with pytest.raises(SystemExit) as e:
        common.main_guard(m.main, ["--data", str(image_folder), "--img-size", "48"])
    assert e.value.code == 2 and "--img-size" in capsys.readouterr().err


def test_unreadable_images_with_workers(image_folder, tmp_path, capfd):
    torch.set_num_threads(1)  # 2 OpenMP threads + 2 workers on 2 shared cores: 20x slower
    write_unreadable(image_folder / "sub" / "7.png", "random")  # 8 files: each epoch draws all
    flags = ["--data", str(image_folder), *TINY_FLAGS[:-1], "2", "--log-every", "100",
             "--save-every", "100", "--sample-every", "100"]
    m.main(flags + ["--out", str(tmp_path / "a"), "--total-iters", "6"])  # 3 epochs, 3 loaders
    assert capfd.readouterr().err.count("7.png: cannot read") == 1
    for f in (image_folder / "sub").iterdir():
        write_unreadable(f, "empty")
    with pytest.raises(SystemExit) as e:
        common.main_guard(m.main, flags + ["--out", str(tmp_path / "b"), "--total-iters", "2"])
    err = capfd.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "Caught" not in err, err
    assert err.splitlines()[-1] == f"error: {image_folder}: none of its 8 images is readable " \
        f"(e.g. {image_folder / 'sub' / '0.png'}); replace them or remove the folder"


def test_bench_prints_one_line(capsys):
    m.main(["--bench", "--bench-iters", "1", *TINY_FLAGS])
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "it/s" in line and "n/a" in line and "TFLOP/s" in line


def test_short_toy_run_sample_and_eval(tmp_path, monkeypatch, capsys):
    out = tmp_path / "toy"
    m.main(["--out", str(out), "--total-iters", "3", "--batch", "8", "--log-every", "1"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["config"]["img_size"] == 32  # the toy preset
    text = capsys.readouterr().out
    lines = console_lines(text)
    assert len(lines) == 3 and all(len(ln) <= 120 for ln in lines) and "0.00 it/s" not in text
    files = summary_files(text)  # the summary names what the run wrote, and only that
    assert [p.name for p in files["samples"]] == ["sample_000003.png"]
    assert [p.name for p in files["figures"]] == ["truncation.png", "style_mixing.png",
                                                  "stochastic_variation.png",
                                                  "interpolation_z.gif", "interpolation_w.gif"]
    assert {p.name for p in files["checkpoint"]} == {"last.pt", "log.jsonl", "oracle.json"}
    assert all(p.stat().st_size > 0 for ps in files.values() for p in ps)
    assert f"sample --out {out}" in text and "--resume auto --total-iters 6" in text
    oracle = json.loads((out / "oracle.json").read_text())
    assert {"valid_fake", "mix_coarse_pos", "trunc_color_std_falls", "noise_shape_kept"} <= \
        oracle.keys() and f"{oracle['valid_fake']:.0%} read as a valid shape" in text
    with Image.open(files["loss curves"][0]) as img:
        assert img.format == "PNG"
    m.main(["sample", "--out", str(out), "--ckpt", str(out / "last.pt")])  # as in 01-03
    for name in ("truncation.png", "style_mixing.png", "stochastic_variation.png",
                 "interpolation_z.gif", "interpolation_w.gif"):
        assert (out / name).stat().st_size > 0
    with Image.open(out / "truncation.png") as img:
        assert img.width > 5 * 32  # 5 ψ columns
    monkeypatch.setattr(m, "LPIPS", lambda net: metrics.LPIPS(net, pretrained=False))
    scores = m.main(["eval", "--out", str(out), "--ppl-samples", "32", "--oracle-samples", "40"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved.keys() == scores.keys() and saved["ppl_w_full"] == scores["ppl_w_full"]
    assert 0 < scores["ppl_z_full"] < float("inf") and 0 < scores["ppl_w_full"] < float("inf")
    assert "valid_fake" in scores and scores["valid_real"] > 0.9  # the oracle reads reals

    def offline(net):
        raise common.UserError("no LPIPS weights; run `python data/download.py weights`")

    monkeypatch.setattr(m, "LPIPS", offline)  # offline: PPL skipped, the oracle still runs
    scores = m.main(["eval", "--out", str(out), "--oracle-samples", "8"])
    assert "ppl_z_full" not in scores and "valid_fake" in scores


# ---------------------------------------------------------------------------- faults
def test_run_folder_overwrite_and_resume_from_another_run(image_folder, tmp_path, capsys):
    def run(out, *extra):
        m.main(["--data", str(image_folder), "--out", str(tmp_path / out), *TINY_FLAGS,
                "--log-every", "1", "--sample-every", "2", *extra])

    run("a", "--total-iters", "4")
    run("b", "--total-iters", "2", "--seed", "1")
    a, b = tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt"
    before = a.read_bytes()
    with pytest.raises(common.UserError) as e:  # would replace run a with run b's continuation
        run("a", "--total-iters", "5", "--resume", str(b))
    assert f"--resume {b}" in str(e.value) and str(a) in str(e.value) and a.read_bytes() == before
    assert "--overwrite" in str(e.value)
    capsys.readouterr()
    run("a", "--total-iters", "2", "--overwrite")  # a clean folder: the old run moved aside
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (tmp_path / "a" / "sample_000004.png").exists()
    assert (tmp_path / "a.old-1" / "sample_000004.png").exists()
    assert (tmp_path / "a.old-1" / "last.pt").read_bytes() == before
    assert f"moved the previous run {tmp_path / 'a'} to {tmp_path / 'a.old-1'}" in \
        capsys.readouterr().out
    with pytest.raises(common.UserError, match=r"--img-size 32: .*b/last.pt was trained with "
                                               r"img_size 16"):
        run("c", "--total-iters", "3", "--resume", str(b), "--img-size", "32")


def test_changed_lr_on_resume_is_applied(image_folder, tmp_path, capsys):
    flags = ["--data", str(image_folder), "--out", str(tmp_path), *TINY_FLAGS]
    m.main(flags + ["--total-iters", "1"])
    m.main(["--out", str(tmp_path), "--resume", "auto", "--total-iters", "2", "--lr", "0.01"])
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert [g["lr"] for g in state["opts"]["G"]["param_groups"]] == [0.01, 0.01 * 0.01]
    assert [g["lr"] for g in state["opts"]["D"]["param_groups"]] == [0.01]
    assert state["config"]["lr"] == 0.01 and state["config"]["img_size"] == 16
    assert "resume: lr 0.001 -> 0.01 (applied)" in capsys.readouterr().out


def test_nan_stops_the_run_at_the_next_log_step(image_folder, tmp_path, monkeypatch):
    real, calls = m.d_step, []

    def broken(G, D, *a, **kw):  # D's update in step 2 leaves it non-finite (as with lr 1e10)
        calls.append(1)
        losses = real(G, D, *a, **kw)
        if len(calls) == 2:
            with torch.no_grad():
                next(D.parameters()).fill_(float("nan"))
        return losses
    monkeypatch.setattr(m, "d_step", broken)
    with pytest.raises(common.UserError, match=r"step 2: loss term 'G/\w+' is nan; stopping"):
        m.main(["--data", str(image_folder), "--out", str(tmp_path), *TINY_FLAGS,
                "--total-iters", "8", "--log-every", "1"])
    assert len(calls) == 2 and not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--batch", "0"], "--batch 0: must be ≥ 1"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    (["--betas", "0.5"], "--betas 0.5: Adam needs two values (β1 β2)")])
def test_bad_flags_are_one_line_errors(flags, msg, tmp_path):
    with pytest.raises(common.UserError, match=re.escape(msg)):
        m.main(flags + ["--out", str(tmp_path)])


@pytest.mark.parametrize("kind", ["empty", "truncated", "another script's"])
def test_sample_with_a_bad_checkpoint_names_the_file(kind, tmp_path):
    path = tmp_path / "x.pt"
    cfg = load_script("02_stargan_v2").Config() if kind == "another script's" else tiny_cfg()
    common.save_checkpoint(path, 1, cfg, {"G": torch.nn.Linear(2, 2)}, {})
    cut = {"empty": b"", "truncated": path.read_bytes()[:900]}
    path.write_bytes(cut.get(kind, path.read_bytes()))
    for flags in (["sample", "--ckpt"], ["eval", "--ckpt"], ["sample", "--resume"]):
        with pytest.raises(common.UserError, match=re.escape(str(path)) + ": (cannot read this "
                                                   "checkpoint|not a checkpoint of this script)"):
            m.main(flags + [str(path), "--out", str(tmp_path)])


# ---------------------------------------------------------------------------- the oracle's figures
class Painter(torch.nn.Module):
    """A hand-made g for 32 px: draws one toy shape whose shape and position come from the w of
    layer `shape_at`, its colour from the w of layer `color_at`; noise adds a faint texture
    (noise_amp), or with noise_shape it picks the shape instead. Layers as the real g's (L = 8)."""
    def __init__(self, shape_at=0, color_at=7, noise_amp=0.1, noise_shape=False, ignore_w=False):
        super().__init__()
        self.num_layers, self.shape_at, self.color_at = 8, shape_at, color_at
        self.noise_amp, self.noise_shape, self.ignore_w = noise_amp, noise_shape, ignore_w
        self.w_mean, self.w_std = 0.0, 1.0  # set by painted(): the factors read standardised w

    def make_noise(self, batch, device):
        return m.Synthesis.make_noise(self, batch, device)

    def forward(self, ws, noise=None):
        B, R = ws.shape[0], 32
        n = torch.randn(B, 1, R, R) if noise is None else noise[-1].expand(B, 1, R, R)
        w_s, w_c = ((ws[:, i] - self.w_mean) / self.w_std for i in (self.shape_at, self.color_at))
        if self.ignore_w:  # a g that draws its own random factors: truncation cannot act
            w_s, w_c = torch.randn_like(w_s), torch.randn_like(w_c)
        shape = (n[:, 0, 0, :3].mean(1) > 0).long() * 2 if self.noise_shape else w_s[:, :3].argmax(1)
        cx, cy = (0.3 + 0.4 * torch.sigmoid(2 * w_s[:, 3 + i])[:, None, None] for i in (0, 1))
        color = 0.35 + 0.6 * torch.sigmoid(2 * w_c[:, 5:8])  # (B, 3), ≥ 0.2 above the grey
        ys, xs = ((torch.arange(R) + 0.5) / R).view(1, R, 1), ((torch.arange(R) + 0.5) / R).view(1, 1, R)
        half = 0.2
        d = torch.stack([((xs - cx) ** 2 + (ys - cy) ** 2).sqrt() - half,  # circle, square, triangle
                         torch.maximum((xs - cx).abs(), (ys - cy).abs()) - half,
                         torch.maximum(ys - (cy + half), (xs - cx).abs() - (ys - cy + half) / 2)], 1)
        mask = (d.gather(1, shape.view(B, 1, 1, 1).expand(B, 1, R, R)) < 0).float()  # (B, 1, R, R)
        texture = 1 + self.noise_amp * n.clamp(-1, 1)
        img = 0.12 * (1 - mask) + color.view(B, 3, 1, 1) * texture * mask
        return img.clamp(0, 1) * 2 - 1


def painted(**kw):
    """A real f (random weights) in front of a Painter; w̄ = the mean of f(z) over many z."""
    cfg = tiny_cfg(img_size=32)
    torch.manual_seed(0)
    G = m.Generator(cfg)
    G.synthesis = Painter(**kw)
    w = G.mapping(torch.randn(4096, cfg.w_dim)).detach()
    G.w_avg.copy_(w.mean(0))
    G.synthesis.w_mean, G.synthesis.w_std = w.mean(0), w.std(0)
    return G, cfg


def test_oracle_reads_style_mixing_and_can_fail():
    G, cfg = painted()  # coarse styles (layer 0) draw shape and position, fine (layer 7) colour
    good = m.mixing_scores(G, cfg, "cpu", n=200)
    assert good["mix_coarse_shape"] > 0.95 and good["mix_coarse_shape_chance"] < 0.5
    assert good["mix_coarse_pos"] > 0.95 and good["mix_coarse_pos_chance"] < 0.2
    assert good["mix_fine_color"] > 0.95 and good["mix_fine_color_chance"] < 0.3
    G, cfg = painted(color_at=0)  # ignores the fine styles: colour comes with the coarse ones
    coarse_only = m.mixing_scores(G, cfg, "cpu", n=200)
    assert coarse_only["mix_coarse_pos"] > 0.95  # still right where it should be
    assert coarse_only["mix_fine_color"] <= coarse_only["mix_fine_color_chance"] + 0.05
    G, cfg = painted(shape_at=7, color_at=7)  # everything in the fine styles
    fine_only = m.mixing_scores(G, cfg, "cpu", n=200)
    assert fine_only["mix_coarse_pos"] <= fine_only["mix_coarse_pos_chance"] + 0.05
    assert m.style_bands(8) == ((0, 4), (4, 6), (6, 8)) and m.style_bands(18)[2] == (8, 18)


def test_oracle_reads_truncation_and_can_fail():
    G, cfg = painted()
    s = m.truncation_scores(G, cfg, "cpu", n=200)
    assert s["trunc_color_std_falls"] == 1 and s["trunc_shape_div_falls"] == 1
    assert s["trunc_color_std_0.0"] < 0.01 < 0.1 < s["trunc_color_std_1.0"]  # ψ = 0: w̄ only
    G, cfg = painted(ignore_w=True)  # draws its own factors: truncation toward w̄ changes nothing
    s = m.truncation_scores(G, cfg, "cpu", n=200)
    assert s["trunc_color_std_falls"] == 0 and s["trunc_shape_div_falls"] == 0


def test_oracle_reads_noise_and_can_fail():
    G, cfg = painted()  # noise: a faint texture only
    s = m.noise_scores(G, cfg, "cpu")
    assert s["noise_shape_kept"] == 1 and s["noise_pixel_std"] > 0.005
    G, cfg = painted(noise_amp=0)  # ignores the noise: nothing varies
    assert m.noise_scores(G, cfg, "cpu")["noise_pixel_std"] == 0
    G, cfg = painted(noise_shape=True)  # noise picks the shape
    assert m.noise_scores(G, cfg, "cpu")["noise_shape_kept"] < 0.7


def test_console_line_fits_120_columns():
    line = widest_console_line(m.console_terms(m.Config()), ["D/adv", "D/r1", "G/adv"], 400_000)
    assert " D -0.0738 " in line  # L_D = adv + γ/2 · R1 = -0.0123 + 5 · -0.0123


# ---------------------------------------------------------------------------- a cluster stops it
def test_stop_signal_saves_and_says_how_to_continue(tmp_path):
    """SIGTERM, a cluster's stop (SLURM at preemption or the time limit, torchrun, Kubernetes),
    saves like Ctrl-C:
    last.pt at the step reported, the log up to it, exit status 128 + signal number, and the
    command that continues the run."""
    out, flags = tmp_path / "run", list(TINY_FLAGS)
    flags += ["--num-workers", "0", "--log-every", "1", "--save-every", "100000", "--sample-every",
              "100000", "--total-iters", "100000", "--out", str(out)]
    rc, text, err = stop_with_signal(["04_stylegan_mapping.py", *flags], signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", text)[1])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step >= 1
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    assert f"python 04_stylegan_mapping.py {' '.join(flags)} --resume auto" in text


def test_resumed_log_holds_each_step_once(image_folder, tmp_path, capsys, monkeypatch):
    """A run killed after logging steps 3-4 but saving step 2: the resume sets those lines aside
    (and a line cut short), so log.jsonl holds steps 1-4 once; a fresh start never appends."""
    monkeypatch.setattr(m, "figures", lambda *a: [])  # the end-of-run figures: not tested here
    out, log = tmp_path / "run", tmp_path / "run" / "log.jsonl"
    flags = ["--data", str(image_folder), "--out", str(out), *TINY_FLAGS, "--log-every", "1",
             "--sample-every", "100"]
    m.main(flags + ["--total-iters", "2"])
    killed = "".join(json.dumps({"step": s, "D": 9.0}) + "\n" for s in (3, 4)) + '{"step": 5, "D'
    log.write_text(log.read_text() + killed)
    capsys.readouterr()
    m.main(flags + ["--total-iters", "4", "--resume", "auto"])
    rows = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r.get("D") != 9.0 for r in rows)
    assert f"{log}: 3 line(s) past step 2, where this run starts, set aside" in capsys.readouterr().out
    assert (out / "log.jsonl.old-1").read_text().endswith(killed)
    (out / "last.pt").unlink()  # as if the run had stopped before its first save
    m.main(flags + ["--total-iters", "1"])
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1]


def test_failed_save_stops_with_one_line_and_keeps_last_pt(image_folder, tmp_path, monkeypatch):
    """A disk that fills up (a file-size limit: writes past it fail with EFBIG, as ENOSPC or a
    quota would): exit status 2, one line naming the file, the cause and the free space; the last
    good last.pt untouched and no last.pt.tmp left. The resumed run meets it before its first
    step, in the start-of-run check (common.check_save), which writes a whole checkpoint."""
    monkeypatch.setattr(m, "figures", lambda *a: [])  # the end-of-run figures: not tested here
    flags = ["--data", image_folder, *TINY_FLAGS, "--log-every", "1", "--sample-every", "100"]
    m.main([*map(str, flags), "--out", str(tmp_path / "a"), "--total-iters", "2"])
    run = shutil.copytree(tmp_path / "a", tmp_path / "run")  # this process holds a's lock
    before = (run / "last.pt").read_bytes()
    limit = len(before) // 2
    r = subprocess.run([sys.executable, "04_stylegan_mapping.py", *map(str, flags), "--out", run,
                        "--total-iters", "3", "--resume", "auto"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit,) * 2))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.fullmatch(rf"error: step 2: cannot write the checkpoint {run / 'last.pt.tmp'} "
                        rf"\(File too large; [0-9.]+ GiB free there\); stopping. The last good "
                        rf"checkpoint, {run / 'last.pt'}, is untouched: .* --resume auto\n", r.stderr)
    assert (run / "last.pt").read_bytes() == before and not (run / "last.pt.tmp").exists()

"""Tests for 02_stargan_v2.py: shapes, official parameter counts and layout, loss signs, which nets
each step updates, EMA, λ_ds schedule, exact resume, official-checkpoint loading, a toy run."""
import copy
import dataclasses
import inspect
import json
import math
import random
import re
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (LAYOUTS, console_lines, load_script, stop_with_signal, summary_files,
                      widest_console_line, write_unreadable)

m = load_script("02_stargan_v2")
from common import UserError, load_checkpoint, save_checkpoint  # noqa: E402 (after sys.path)
from common import strip_prefixes as common_strip  # noqa: E402
from data import fan as data_fan  # noqa: E402
from data import toy  # noqa: E402 (our own toy data and its oracle)


def tiny_cfg(**kw):
    base = dict(img_size=32, dim_in=8, max_conv_dim=16, mapping_dim=16, num_domains=3, batch=2,
                total_iters=10, ds_iter=10, randcrop_prob=0.0, num_workers=0)
    return m.Config(**{**base, **kw})


def batch_of(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.rand(B, 3, cfg.img_size, cfg.img_size, generator=g) * 2 - 1  # noqa: E731
    y = lambda: torch.randint(cfg.num_domains, (B,), generator=g)  # noqa: E731
    return x(), y(), x(), x(), y()


def snapshot(nets):
    return {k: [p.detach().clone() for p in getattr(nets, k).parameters()] for k in m.NET_NAMES}


def changed(before, nets):
    return {k for k in m.NET_NAMES
            if any(not torch.equal(a, b) for a, b in zip(before[k], getattr(nets, k).parameters()))}


@pytest.mark.parametrize("img_size,B", [(32, 1), (64, 3)])
def test_shapes(img_size, B):
    cfg = tiny_cfg(img_size=img_size)
    nets, _ = m.build_nets(cfg)
    x, y = torch.randn(B, 3, img_size, img_size), torch.randint(3, (B,))
    s = nets.mapping(torch.randn(B, 16), y)
    assert s.shape == (B, 64)
    assert nets.E(x, y).shape == (B, 64)
    assert nets.G(x, s).shape == (B, 3, img_size, img_size)
    assert nets.D(x, y).shape == (B,)


def test_shapes_with_hpf_masks():
    cfg = tiny_cfg(img_size=64, w_hpf=1.0)
    nets, _ = m.build_nets(cfg)
    x, s = torch.randn(2, 3, 64, 64), torch.randn(2, 64)
    masks = (torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64))
    out_masked, out_plain = nets.G(x, s, masks), nets.G(x, s)
    assert out_masked.shape == (2, 3, 64, 64)
    assert not torch.allclose(out_masked, out_plain)  # the high-pass skip path is active


def _count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("preset,counts", [
    ("afhq", (33_892_995, 3_259_072, 20_949_760, 20_852_803)),
    ("celeba_hq", (43_467_395, 2_438_272, 20_916_928, 20_852_290))])
def test_parameter_counts_and_official_layout(preset, counts):
    c = m.Config(**m.PRESETS[preset])
    nets = [m.Generator(c.img_size, c.style_dim, c.max_conv_dim, c.w_hpf),
            m.MappingNetwork(c.latent_dim, c.style_dim, c.num_domains),
            m.StyleEncoder(c.img_size, c.style_dim, c.num_domains, c.max_conv_dim),
            m.Discriminator(c.img_size, c.num_domains, c.max_conv_dim)]
    assert tuple(_count(n) for n in nets) == counts
    # The official state_dict entries, in order: what load_official relies on.
    layout = LAYOUTS / f"stargan_v2_{preset}_256.txt"
    want = [ln.split(" ", 2) for ln in layout.read_text().splitlines() if ln[:1] not in "#"]
    ours = [(t, k, str(tuple(v.shape))) for t, n in zip(m.OFFICIAL_NAMES.values(), nets)
            for k, v in n.state_dict().items()]
    assert len(want) > 200 and [(a, b, c.replace(" ", "")) for a, b, c in want] == \
           [(a, b, c.replace(" ", "")) for a, b, c in ours]


def test_he_init_and_biases_zero():
    # fan_in 64·9 and fan_out 256·9 differ 4x: the std tells kaiming's two modes apart
    conv = m.he_init(torch.nn.Sequential(torch.nn.Conv2d(64, 256, 3), torch.nn.Linear(512, 64)))
    assert conv[0].bias.abs().max() == 0 and conv[1].bias.abs().max() == 0
    assert abs(conv[0].weight.std().item() - (2 / (64 * 9)) ** 0.5) < 0.002  # fan_in, ReLU gain
    assert abs(conv[1].weight.std().item() - (2 / 512) ** 0.5) < 0.003


def test_adv_loss_values_and_sign():
    assert torch.isclose(m.adv_loss(torch.zeros(4), 1), torch.tensor(2.0).log())
    assert m.adv_loss(torch.full((4,), 5.0), 1) < m.adv_loss(torch.full((4,), 5.0), 0)


def test_losses_match_the_equations_with_weights_other_than_one():
    """d_loss and g_loss term by term and in total, recomputed here from Eqs. (1)-(5) and App. B
    with every λ ≠ 1 (at λ = 1 a dropped weight would not show)."""
    cfg = tiny_cfg(img_size=16, lambda_reg=3.0, lambda_sty=2.0, lambda_cyc=4.0)
    nets, _ = m.build_nets(cfg)
    x_real, y_org, x_ref, x_ref2, y_trg = batch_of(cfg)
    z, z2 = torch.randn(2, 2, 16)
    G, D, E, mapping = nets.G, nets.D, nets.E, nets.mapping
    x = x_real.clone().requires_grad_()
    out = D(x, y_org)  # (B,)
    grad, = torch.autograd.grad(out.sum(), x)
    real, reg = F.softplus(-out).mean(), 0.5 * grad.pow(2).sum((1, 2, 3)).mean()  # −log σ, R1
    for kw, s_trg in ((dict(z_trg=z), mapping(z, y_trg)), (dict(x_ref=x_ref), E(x_ref, y_trg))):
        loss, t = m.d_loss(nets, cfg, x_real, y_org, y_trg, **kw)
        fake = F.softplus(D(G(x_real, s_trg), y_trg)).mean()  # −log(1 − σ)
        for got, want in zip((t["real"], t["fake"], t["reg"], loss),
                             (real, fake, reg, real + fake + 3.0 * reg)):
            torch.testing.assert_close(got, want)
    loss, t = m.g_loss(nets, cfg, 0.5, x_real, y_org, y_trg, z_trgs=torch.stack([z, z2]))
    s1, s2 = mapping(z, y_trg), mapping(z2, y_trg)
    x_fake = G(x_real, s1)
    want = dict(adv=F.softplus(-D(x_fake, y_trg)).mean(),
                sty=(E(x_fake, y_trg) - s1).abs().mean(),  # Eq. (2)
                ds=(x_fake - G(x_real, s2)).abs().mean(),  # Eq. (3)
                cyc=(G(x_fake, E(x_real, y_org)) - x_real).abs().mean())  # Eq. (4), ŝ = E_y(x)
    for k in want:
        torch.testing.assert_close(t[k], want[k])
    torch.testing.assert_close(loss, want["adv"] + 2.0 * want["sty"] - 0.5 * want["ds"]
                               + 4.0 * want["cyc"])  # Eq. (5), λ_ds = 0.5 as passed
    _, t = m.g_loss(nets, cfg, 0.5, x_real, y_org, y_trg, x_refs=(x_ref, x_ref2))
    x_fake = G(x_real, E(x_ref, y_trg))  # reference styles: s̃ = E_ỹ(x_ref)
    torch.testing.assert_close(t["ds"], (x_fake - G(x_real, E(x_ref2, y_trg))).abs().mean())


def test_g_total_gradient_signs():
    cfg = tiny_cfg(lambda_sty=1.5, lambda_cyc=3.0)
    terms = [torch.tensor(0.3, requires_grad=True) for _ in range(4)]
    m.g_total(*terms, cfg, lambda_ds=2.0).backward()
    assert [t.grad.item() for t in terms] == [1.0, 1.5, -2.0, 3.0]  # ∂L_G/∂L_ds = −λ_ds


def test_ds_loss_detaches_second_image():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    m.ds_loss(a, b).backward()
    assert b.grad is None and a.grad.abs().sum() > 0


def test_each_step_updates_only_its_nets():
    cfg = tiny_cfg()
    nets, _ = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    x_real, y_org, x_ref, x_ref2, y_trg = batch_of(cfg)
    before = snapshot(nets)
    m.d_step(nets, optims, cfg, x_real, y_org, y_trg, z_trg=torch.randn(2, 16))
    assert changed(before, nets) == {"D"}
    before = snapshot(nets)
    m.d_step(nets, optims, cfg, x_real, y_org, y_trg, x_ref=x_ref)
    assert changed(before, nets) == {"D"}
    before = snapshot(nets)
    m.g_step(nets, optims, cfg, 1.0, x_real, y_org, y_trg, z_trgs=torch.randn(2, 2, 16))
    assert changed(before, nets) == {"G", "mapping", "E"}
    before = snapshot(nets)
    m.g_step(nets, optims, cfg, 1.0, x_real, y_org, y_trg, x_refs=(x_ref, x_ref2))
    assert changed(before, nets) == {"G"}


def test_ema_moves_toward_online():
    cfg = tiny_cfg(ema_beta=0.9)
    nets, ema = m.build_nets(cfg)
    assert all(torch.equal(a, b) for a, b in zip(ema.G.parameters(), nets.G.parameters()))
    with torch.no_grad():
        for p in nets.G.parameters():
            p.add_(1.0)
    gap = [(p - q).clone() for p, q in zip(nets.G.parameters(), ema.G.parameters())]
    m.ema_update(ema, nets, cfg.ema_beta)
    for g, p, q in zip(gap, nets.G.parameters(), ema.G.parameters()):
        assert torch.allclose(p - q, 0.9 * g, atol=1e-6)  # the gap shrinks by β
    assert not any(p.requires_grad for p in ema.E.parameters())


def test_lambda_ds_schedule():
    cfg = tiny_cfg(lambda_ds=2.0, ds_iter=100000)
    assert m.lambda_ds_at(0, cfg) == 2.0
    assert m.lambda_ds_at(50000, cfg) == pytest.approx(1.0)
    assert m.lambda_ds_at(100000, cfg) == 0.0 and m.lambda_ds_at(150000, cfg) == 0.0


def test_train_step_mid_decay_with_a_non_default_ema_beta(monkeypatch):
    """One train_step at step 3 of ds_iter 4 with β = 0.6: λ_ds(3) = 2·(1 − 3/4) is logged and
    used by both G steps, and every EMA parameter ends at β·before + (1 − β)·the updated net."""
    cfg = tiny_cfg(img_size=16, lambda_ds=2.0, ds_iter=4, ema_beta=0.6)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    with torch.no_grad():  # EMA apart from the online nets: the direction of the lerp shows
        for p in (p for avg in vars(ema).values() for p in avg.parameters()):
            p.add_(torch.randn_like(p))
    before = {k: [p.clone() for p in avg.parameters()] for k, avg in vars(ema).items()}
    used, g_total = [], m.g_total
    sig = inspect.signature(g_total)

    def spy(*a, **kw):  # the λ_ds each G step's Eq. (5) gets
        used.append(sig.bind(*a, **kw).arguments["lambda_ds"])
        return g_total(*a, **kw)
    monkeypatch.setattr(m, "g_total", spy)
    logs = m.train_step(nets, ema, optims, batch_of(cfg), 3, cfg)
    assert logs["G/lambda_ds"].item() == 0.5 and used == [0.5, 0.5]
    for k, avg in vars(ema).items():
        for old, p, q in zip(before[k], avg.parameters(), getattr(nets, k).parameters()):
            torch.testing.assert_close(p, 0.6 * old + 0.4 * q)


def test_train_step_wires_the_batch(monkeypatch):
    """The official order: D with a latent style, D with x_ref's, G with (z, z2) through F, G with
    (x_ref, x_ref2) through E; the latent D step uses the G step's first z; all on one batch."""
    cfg = tiny_cfg(img_size=16)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    calls, batch = [], batch_of(cfg)
    for name in ("d_step", "g_step"):
        real = getattr(m, name)
        sig = inspect.signature(real)
        monkeypatch.setattr(m, name, lambda *a, _f=real, _s=sig, **kw: calls.append(
            (_f.__name__, _s.bind(*a, **kw).arguments)) or _f(*a, **kw))
    m.train_step(nets, ema, optims, batch, 0, cfg)
    x_real, y_org, x_ref, x_ref2, y_trg = batch
    assert [n for n, _ in calls] == ["d_step", "d_step", "g_step", "g_step"]
    assert all(a["x_real"] is x_real and a["y_org"] is y_org and a["y_trg"] is y_trg
               for _, a in calls)
    (_, d_lat), (_, d_ref), (_, g_lat), (_, g_ref) = calls
    assert torch.equal(d_lat["z_trg"], g_lat["z_trgs"][0]) and not torch.equal(*g_lat["z_trgs"])
    assert d_ref["x_ref"] is x_ref and [x is y for x, y in zip(g_ref["x_refs"], (x_ref, x_ref2))] \
        == [True, True]
    assert "x_ref" not in d_lat and "z_trg" not in d_ref and "x_refs" not in g_lat


def test_resume_gives_identical_next_losses(tmp_path):
    cfg = tiny_cfg()
    torch.manual_seed(1)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    all_nets = {**vars(nets), **{k + "_ema": v for k, v in vars(ema).items()}}
    for step in range(2):
        m.train_step(nets, ema, optims, batch_of(cfg, seed=step), step, cfg)
    save_checkpoint(tmp_path / "last.pt", 2, cfg, all_nets, optims)
    want = m.train_step(nets, ema, optims, batch_of(cfg, seed=2), 2, cfg)
    torch.manual_seed(123)  # a different init and RNG state: the checkpoint must restore both
    nets2, ema2 = m.build_nets(cfg)
    optims2 = m.build_optims(nets2, cfg)
    all2 = {**vars(nets2), **{k + "_ema": v for k, v in vars(ema2).items()}}
    step = load_checkpoint(tmp_path / "last.pt", all2, optims2)["step"]
    got = m.train_step(nets2, ema2, optims2, batch_of(cfg, seed=2), step, cfg)
    assert step == 2 and {k: v.item() for k, v in got.items()} == \
        {k: v.item() for k, v in want.items()}


def _official_file(path, nets, layout):
    """A release-style file: official names; '2020' has no hpf.filter and no discriminator (a
    nets_ema file), '2021' has both, 'module' is a 2021 file saved through nn.DataParallel."""
    ckpt = {}
    for ours, official in m.OFFICIAL_NAMES.items():
        if ours == "D" and layout == "2020":
            continue
        sd = {k: torch.randn_like(v) for k, v in getattr(nets, ours).state_dict().items()}
        if layout == "2020":
            sd.pop("hpf.filter", None)
        ckpt[official] = {("module." if layout == "module" else "") + k: v for k, v in sd.items()}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("layout", ["2020", "2021", "module"])
def test_load_official_round_trip(tmp_path, layout):
    cfg = tiny_cfg(w_hpf=1.0, img_size=64)
    src, _ = m.build_nets(cfg)
    ckpt = _official_file(tmp_path / "100000_nets_ema.ckpt", src, layout)
    dst, _ = m.build_nets(cfg)
    d_before = [p.clone() for p in dst.D.state_dict().values()]
    m.load_official(tmp_path / "100000_nets_ema.ckpt", vars(dst))
    for ours, official in m.OFFICIAL_NAMES.items():
        loaded = getattr(dst, ours).state_dict()
        if official not in ckpt:  # nets_ema files hold no D: ours is left untouched
            assert all(torch.equal(a, b) for a, b in zip(d_before, loaded.values()))
            continue
        theirs = common_strip(ckpt[official])
        assert theirs.keys() <= loaded.keys()
        assert all(torch.equal(theirs[k], loaded[k]) for k in theirs)
    filt = dst.G.state_dict()["hpf.filter"]  # the 2020 files lack it: the official constant stays
    if layout == "2020":
        assert torch.equal(filt, torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]]))


def test_load_official_names_the_real_mismatches(tmp_path):
    cfg = tiny_cfg(w_hpf=1.0, img_size=64)
    src, _ = m.build_nets(cfg)
    _official_file(tmp_path / "a.ckpt", src, "2021")
    wrong, _ = m.build_nets(tiny_cfg(w_hpf=1.0, img_size=64, num_domains=2))
    with pytest.raises(UserError, match=r"style_encoder has unexpected \['unshared.2.weight'"):
        m.load_official(tmp_path / "a.ckpt", {"E": wrong.E})  # 3 domains in the file, 2 here
    plain, _ = m.build_nets(tiny_cfg(w_hpf=0.0, img_size=64))  # the AFHQ generator layout
    with pytest.raises(UserError, match=r"generator (lacks|has unexpected)"):
        m.load_official(tmp_path / "a.ckpt", {"G": plain.G})
    other, _ = m.build_nets(tiny_cfg(w_hpf=1.0, img_size=64, dim_in=16, max_conv_dim=32))
    with pytest.raises(UserError, match=r"generator.from_rgb.weight is \(8, 3, 3, 3\), ours"):
        m.load_official(tmp_path / "a.ckpt", {"G": other.G})
    torch.save({"state_dict": {}}, tmp_path / "wing.ckpt")
    with pytest.raises(UserError, match="not a StarGAN v2 release file"):
        m.load_official(tmp_path / "wing.ckpt", {"G": src.G})


class _SpyFAN(torch.nn.Module):
    """A small random FAN that records what it was asked to mask."""
    def __init__(self):
        super().__init__()
        self.fan, self.inputs = data_fan.FAN(width=16), []

    def masks(self, x):
        self.inputs.append(x.detach().clone())
        return self.fan.masks(x)


def test_hpf_training_iteration_uses_fan_masks(tmp_path):
    cfg = tiny_cfg(img_size=64, w_hpf=1.0)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    plain = copy.deepcopy((nets, ema, optims))
    before, batch, fan = snapshot(nets), batch_of(cfg), _SpyFAN()
    torch.manual_seed(1)
    logs = m.train_step(nets, ema, optims, batch, 0, cfg, fan)
    assert all(torch.isfinite(v) for v in logs.values())
    assert changed(before, nets) == set(m.NET_NAMES)
    # Official: FAN(x_real) once for all four steps, FAN(x_fake) for each G step's cycle term.
    assert len(fan.inputs) == 3 and torch.equal(fan.inputs[0], batch[0])
    assert not any(torch.equal(x, batch[0]) for x in fan.inputs[1:])
    torch.manual_seed(1)
    m.train_step(*plain, batch, 0, cfg)  # the same step without masks: G ends elsewhere
    assert any(not torch.equal(a, b) for a, b in zip(nets.G.parameters(), plain[0].G.parameters()))
    x_src, y = batch[0], batch[1]
    m.write_samples(ema, (x_src, y, batch[2], batch[4]), tmp_path, "t", cfg, fan, n_z=1)
    assert (tmp_path / "t_masks.png").is_file() and (tmp_path / "t_reference.png").is_file()


def test_hpf_without_fan_file_is_one_line_error(tmp_path, capsys):
    argv = ["--preset", "celeba_hq", "--wing", str(tmp_path / "wing.ckpt"), "--out",
            str(tmp_path / "run")]
    for mode in ([], ["sample", "--official-ckpt", str(tmp_path / "x.ckpt"), "--src", "a.png"]):
        with pytest.raises(UserError, match=r"--w-hpf 1.0: .*not found at .*wing.ckpt; run "
                                            r"`python data/download.py wing`.*--w-hpf 0"):
            m.main(mode + argv)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_short_toy_run_writes_samples_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--out", str(out), "--total-iters", "4", "--sample-every", "2", "--save-every", "2",
             "--log-every", "1", "--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16"]
    scores = m.main(flags)
    assert set(scores) >= {"acc_latent", "acc_ref", "shape_kept_ref", "pos_err_latent",
                           "color_err_ref"}
    text = capsys.readouterr().out
    assert len(console_lines(text)) == 4 and all(len(ln) <= 120 for ln in console_lines(text))
    files = summary_files(text)  # the summary names what the run wrote
    assert [p.name for p in files["samples"]] == [
        "000004_cycle.png", "000004_reference.png", "000004_latent_psi1.0.png",
        "000004_latent_psi0.7.png", "000004_latent_psi0.5.png"]
    assert [p.name for p in files["loss curves"]] == ["losses.png"]
    assert all(p.is_file() for ps in files.values() for p in ps)
    assert f"sky reached {scores['acc_latent']:.2f}/{scores['acc_ref']:.2f}" in text
    prose = [ln for ln in text.splitlines() if "G params" not in ln and "python " not in ln]
    assert all(len(ln) <= 120 for ln in prose), text  # commands are never wrapped (copied)
    src = text.split(" sample --out ")[1].split()[2]  # a val image of domain 0, then --domain 1
    assert Path(src).is_file() and Path(src).parent.name == "day"
    names = {p.name for p in (out / "samples").iterdir()}
    assert {"000004_cycle.png", "000004_latent_psi0.5.png", "000004_latent_psi1.0.png",
            "000004_reference.png"} <= names
    logs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    toy_cfg = m.Config(**m.PRESETS["toy"])  # λ_ds as step s − 1 used it: the schedule is logged
    terms = {f"D/{s}_{k}" for s in ("latent", "ref") for k in ("real", "fake", "reg")} | {
        f"G/{s}_{k}" for s in ("latent", "ref") for k in ("adv", "sty", "ds", "cyc")}
    assert [rec["step"] for rec in logs] == [1, 2, 3, 4] and all(
        rec["G/lambda_ds"] == pytest.approx(m.lambda_ds_at(rec["step"] - 1, toy_cfg)) and
        terms <= rec.keys() and all(math.isfinite(v) for v in rec.values()) for rec in logs)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["step"] == 4 and set(saved["nets"]) == {"G", "mapping", "E", "D", "G_ema",
                                                         "mapping_ema", "E_ema"}
    with pytest.raises(UserError, match="--resume auto"):
        m.main(flags)  # never silently overwrite a run
    m.main(flags[:3] + ["5"] + flags[4:] + ["--resume", "auto"])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5
    # sample mode on a user image (any size, any mode) with latent styles -> grid + GIF
    from PIL import Image
    Image.new("L", (50, 40), 128).save(tmp_path / "grey.png")
    m.main(["sample", "--ckpt", str(out / "last.pt"), "--src", str(tmp_path / "grey.png"),
            "--domain", "2", "--n-styles", "2"])
    assert {"latent.png", "interpolation.gif"} <= {p.name for p in (out / "sample").iterdir()}
    with pytest.raises(UserError, match="--domain"):
        m.main(["sample", "--ckpt", str(out / "last.pt"), "--src", str(tmp_path / "grey.png"),
                "--domain", "7"])


def assert_same(a, b, where=""):
    """Checkpoint contents equal bit for bit (tensors, numbers, nested dicts and lists)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}/{i}")
    else:
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, where


def test_train_resume_is_exact(tmp_path):
    """Through main, as 01, 03 and 04: a run saved at step 2 and resumed to 4 ends with the same
    nets, EMA nets and optimizer states, bit for bit, as one run of 4 steps."""
    def run(out, *extra):
        m.main(RUN + ["--out", str(tmp_path / out), "--save-every", "2", *extra])
        return torch.load(tmp_path / out / "last.pt", weights_only=True)

    straight = run("a", "--total-iters", "4")
    assert run("b", "--total-iters", "2")["step"] == 2
    resumed = run("b", "--total-iters", "4", "--resume", "auto")
    assert resumed["step"] == 4 and set(resumed["nets"]) == set(straight["nets"])
    assert_same(straight["nets"], resumed["nets"], "nets")
    assert_same(straight["opts"], resumed["opts"], "opts")


def test_val_domains_must_match_train(tmp_path):
    toy.write_scenes(tmp_path, 16, n_train=2, n_val=2, seed=0)
    (tmp_path / "val" / "day").rename(tmp_path / "val" / "sunny")
    shutil.copytree(tmp_path / "val" / "dusk", tmp_path / "val" / "extra")
    with pytest.raises(UserError, match=r"val: domain folders \['dusk', 'extra', 'night', "
                       r"'sunny'\] differ from train/'s \['day', 'dusk', 'night'\]"):
        m.main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--img-size", "16",
                "--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16", "--batch", "2",
                "--num-workers", "0", "--total-iters", "1"])


def test_unreadable_file_is_named_once(tmp_path, capsys):
    toy.write_scenes(tmp_path, 16, n_train=3, n_val=0, seed=0)
    write_unreadable(tmp_path / "train" / "dusk" / "bad.png", "text")
    root, src, ref = m.domain_sets(tiny_cfg(data=str(tmp_path), img_size=16))
    for _ in range(3):  # sources and references draw it often; the warning comes once
        assert [y for _, y in (src[i] for i in range(len(src)))] == src.targets
        assert [y for *_, y in (ref[i] for i in range(len(ref)))] == ref.targets
    assert capsys.readouterr().err.count("bad.png") == 1 and src.n_skipped == ref.n_skipped == 1


class SkyPainter(torch.nn.Module):
    """A hand-made translator for the toy scenes. "repaint": keeps the source object and paints the
    target domain's sky behind it (the domain is the argmax of the style's first K entries);
    "identity": returns the source; "shift": repaints, then moves everything a quarter of the
    image to the right (rows keep their sky, the object lands elsewhere)."""
    def __init__(self, K, S, mode):
        super().__init__()
        self.K, self.S, self.mode = K, S, mode

    def style(self, y):
        return torch.nn.functional.one_hot(y, self.S).float()

    def forward(self, x, s, masks=None):  # the signature of G
        if self.mode == "identity":
            return x
        src, trg = toy.read_scenes(x)["domain"], s[:, :self.K].argmax(1)
        sky = lambda d: torch.stack([toy.sky(k, x.shape[-1]) for k in d.tolist()]) * 2 - 1  # noqa
        keep = (x - sky(src)).abs().amax(1, keepdim=True) > 0.02
        out = torch.where(keep, x, sky(trg))
        return out.roll(x.shape[-1] // 4, dims=3) if self.mode == "shift" else out


@pytest.mark.parametrize("mode", ["repaint", "identity", "shift"])
def test_oracle_scores_a_right_and_a_wrong_translator(mode):
    cfg = m.Config(**m.PRESETS["toy"])
    root = m.resolve_data("", "scenes", cfg.img_size)
    g = SkyPainter(cfg.num_domains, cfg.style_dim, mode)
    nets = m.SimpleNamespace(G=g, mapping=lambda z, y: g.style(y), E=lambda x, y: g.style(y))
    r = m.oracle_scores(nets, root, cfg, "cpu", "test")
    if mode == "shift":  # the right sky (but where the object wraps round), moved: not kept
        assert r["acc_latent"] > 0.9 and r["pos_kept_latent"] < 0.2 and r["pos_kept_ref"] < 0.2
        assert r["pos_err_latent"] > 0.05
        return
    # The object is kept (the repaint leaves a one-pixel rim of the old sky around it, which at
    # 16 px moves a few readings; chance level is shape 0.35, position error 0.14).
    assert r["shape_kept_latent"] >= 0.95 and r["pos_err_ref"] < 0.03
    assert r["pos_kept_latent"] >= 0.9 and r["pos_kept_ref"] >= 0.9
    if mode == "repaint":  # the right sky: domain reached; colour is the source's, not the ref's
        # (≥ 0.99: where a large square touches the border, the old sky's rim hides the new sky
        # from the reader; 1 of the 150 val images)
        assert min(r["acc_latent"], r["acc_ref"]) >= 0.99 and r["color_err_ref"] > 0.1
    else:  # the identity keeps the source's sky: never the target domain
        assert r["acc_latent"] == 0.0 and r["acc_ref"] == 0.0
    assert r["diversity_color"] == 0.0  # the same output for every z


def test_oracle_line_with_nothing_readable_says_so():
    # Step 0: no output holds a readable object, so there is no colour to compare with the
    # reference; the line must say that, not print nan.
    s = {f"{k}_{mode}": 0.0 for k in ("acc", "pos_kept", "shape_kept")
         for mode in ("latent", "ref")}
    s |= {"color_err_ref": float("nan"), "diversity_color": 0.04}
    line = m.oracle_lines(s)[1]
    assert "nan" not in line and "colour error vs the reference - (no readable output)" in line
    s["color_err_ref"] = 0.093
    assert "colour error vs the reference 0.09," in m.oracle_lines(s)[1]


@pytest.mark.parametrize("preset", sorted(m.PRESETS))
def test_every_preset_trains_f_100x_slower_than_g(preset):
    # Official: F at 1e-6 against 1e-4 for G, E and D. A preset that raises lr must raise f_lr
    # with it, or F stays at its initial weights (the toy's colour then leaked from the source).
    cfg = m.Config(**m.PRESETS[preset])
    assert cfg.f_lr == pytest.approx(cfg.lr / 100)


def test_bench_prints_one_line(capsys):
    m.main(["--bench", "--bench-iters", "1", "--dim-in", "8", "--max-conv-dim", "16", "--batch",
            "2"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bench")]
    assert len(lines) == 1 and "it/s" in lines[0] and "n/a" in lines[0] and "TFLOP/s" in lines[0]


def test_config_presets_match_official():
    afhq, celeba = m.Config(**m.PRESETS["afhq"]), m.Config(**m.PRESETS["celeba_hq"])
    assert (afhq.lambda_ds, afhq.w_hpf, afhq.num_domains) == (2.0, 0.0, 3)
    assert (celeba.lambda_ds, celeba.w_hpf, celeba.num_domains) == (1.0, 1.0, 2)
    d = dataclasses.asdict(afhq)
    assert (d["lr"], d["f_lr"], d["beta1"], d["beta2"], d["weight_decay"], d["batch"],
            d["total_iters"], d["ema_beta"], d["img_size"]) == \
        (1e-4, 1e-6, 0.0, 0.99, 1e-4, 8, 100000, 0.999, 256)


def test_align_mode_writes_one_png_per_readable_face(tmp_path, capsys):
    import zipfile
    from PIL import Image
    fan = data_fan.FAN()
    torch.save({"state_dict": fan.state_dict()}, tmp_path / "wing.ckpt")
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (98, 2), }".ljust(117) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + \
        struct.pack("<196d", *[60 + v % 140 for v in range(196)])  # a (98, 2) float64 .npy
    with zipfile.ZipFile(tmp_path / "celeba_lm_mean.npz", "w") as z:
        z.writestr("mean.npy", raw)
    src = tmp_path / "faces"
    src.mkdir()
    for name, size in (("a.jpg", (40, 50)), ("b.png", (64, 64))):
        Image.new("RGB", size, (200, 120, 90)).save(src / name)
    (src / "c.png").write_bytes(b"not an image")
    m.main(["align", "--src", str(src), "--out", str(tmp_path / "out"), "--img-size", "64",
            "--wing", str(tmp_path / "wing.ckpt")])
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "out" / "a.png").size == (64, 64)
    assert "skipped" in out and "c.png" in out
    cfg = tiny_cfg(img_size=32)  # sample --align: sources and references aligned first
    nets, ema = m.build_nets(cfg)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "last.pt", 1, cfg,
                    {**vars(nets), **{k + "_ema": v for k, v in vars(ema).items()}}, {})
    calls = []
    real = m.align_faces
    m.align_faces = lambda *a: calls.append(len(a[1])) or real(*a)
    try:
        m.main(["sample", "--ckpt", str(tmp_path / "run" / "last.pt"), "--src", str(src / "a.jpg"),
                "--ref", str(src / "b.png"), "--align", "--wing", str(tmp_path / "wing.ckpt")])
    finally:
        m.align_faces = real
    assert calls == [1, 1] and (tmp_path / "run" / "sample" / "reference.png").is_file()
    (tmp_path / "celeba_lm_mean.npz").unlink()
    with pytest.raises(UserError, match="celeba_lm_mean.npz: missing.*download.py wing"):
        m.main(["align", "--src", str(src), "--out", str(tmp_path / "o2"), "--wing",
                str(tmp_path / "wing.ckpt")])


# ---------------------------------------------------------------------------- faults
RUN = ["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16", "--sample-every", "100"]


def break_after(calls_before_ctrl_c=None, nan_after=1):
    """train_step that leaves D non-finite after call `nan_after`; Ctrl-C at another call."""
    real, calls = m.train_step, []

    def broken(nets, *a, **kw):
        calls.append(1)
        if len(calls) == calls_before_ctrl_c:
            raise KeyboardInterrupt
        logs = real(nets, *a, **kw)
        if len(calls) == nan_after:
            with torch.no_grad():
                next(nets.D.parameters()).fill_(float("nan"))
        return logs
    return broken, calls


def test_sources_and_references_are_drawn_independently(tmp_path, monkeypatch):
    """Sources and references come from two class-balanced streams with their own draws (as
    official); the same seed for both once made every reference the source image itself."""
    seen = []

    def record(nets, ema, optims, batch, *a, **kw):  # the batches of 3 steps, then Ctrl-C
        seen.append([t.clone() for t in batch])
        if len(seen) == 3:
            raise KeyboardInterrupt
        return {}
    monkeypatch.setattr(m, "train_step", record)
    m.main(RUN + ["--out", str(tmp_path), "--batch", "8"])
    x_real, y_org, x_ref, _, y_trg = (torch.cat(t) for t in zip(*seen))
    assert (y_org != y_trg).float().mean() > 0.4  # 3 domains: 2/3 of pairs differ by chance
    assert not any(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(x_real, x_ref))


def test_interrupt_after_nan_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    m.main(RUN + ["--out", str(out), "--total-iters", "2", "--save-every", "2"])
    good = (out / "last.pt").read_bytes()
    broken, _ = break_after(calls_before_ctrl_c=3)  # step 4's losses are nan, Ctrl-C in step 5
    monkeypatch.setattr(m, "train_step", broken)
    with pytest.raises(UserError, match=r"step 4: loss term 'D/latent_real' is nan; stopping "
                                        rf"without saving. Last good checkpoint: {out}/last.pt"):
        m.main(RUN + ["--out", str(out), "--total-iters", "50", "--resume", "auto",
                      "--log-every", "100", "--save-every", "100"])
    assert (out / "last.pt").read_bytes() == good


def test_nan_stops_the_run_at_the_next_log_step(tmp_path, monkeypatch):
    broken, calls = break_after()
    monkeypatch.setattr(m, "train_step", broken)
    with pytest.raises(UserError, match=r"step 2: loss term 'D/latent_real' is nan; stopping"):
        m.main(RUN + ["--out", str(tmp_path), "--total-iters", "8", "--log-every", "1",
                      "--save-every", "100"])
    assert len(calls) == 2 and not (tmp_path / "last.pt").exists()


def test_changed_settings_on_resume_are_applied_or_refused(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    m.main(RUN + out + ["--total-iters", "2", "--save-every", "2", "--lr", "2e-4"])
    m.main(out + ["--total-iters", "3", "--resume", "auto", "--lr", "1e-3"])  # the rest: as saved
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    lrs = {n: [g["lr"] for g in o["param_groups"]] for n, o in state["opts"].items()}
    assert state["config"]["lr"] == 1e-3 and state["config"]["dim_in"] == 4
    assert lrs == {"G": [1e-3], "mapping": [1e-5], "E": [1e-3], "D": [1e-3]}  # used = recorded
    # Adam's moments came back too: per iteration D and G take 2 steps, F and E 1 (3 iterations)
    steps = {n: {float(s["step"]) for s in o["state"].values()} for n, o in state["opts"].items()}
    assert steps == {"G": {6.0}, "mapping": {3.0}, "E": {3.0}, "D": {6.0}}
    assert "resume: lr 0.0002 -> 0.001 (applied)" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--img-size 32: .*last.pt was trained with img_size 16"):
        m.main(out + ["--total-iters", "4", "--resume", "auto", "--img-size", "32"])


@pytest.mark.parametrize("flags,msg", [
    (["--batch", "0"], "--batch 0: must be ≥ 1"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--f-lr", "-1"], "--f-lr -1.0: must be > 0"),
    (["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    (["--img-size", "100"], "--img-size 100: must be a power of two ≥ 8")])
def test_bad_flags_are_one_line_errors(flags, msg, tmp_path):
    with pytest.raises(UserError, match=re.escape(msg)):
        m.main(flags + ["--out", str(tmp_path)])


@pytest.mark.parametrize("kind", ["empty", "truncated", "another script's"])
def test_sample_with_a_bad_checkpoint_names_the_file(kind, tmp_path):
    path = tmp_path / "x.pt"
    cfg = load_script("04_stylegan_mapping").Config() if kind == "another script's" else tiny_cfg()
    save_checkpoint(path, 1, cfg, {"G": torch.nn.Linear(2, 2)}, {})
    cut = {"empty": b"", "truncated": path.read_bytes()[:900]}
    path.write_bytes(cut.get(kind, path.read_bytes()))
    for mode in ("sample", "eval"):
        with pytest.raises(UserError, match=re.escape(str(path)) + ": (cannot read this checkpoint"
                                            "|not a checkpoint of this script)"):
            m.main([mode, "--ckpt", str(path), "--src", str(path)])


def test_console_line_fits_120_columns():
    cfg = m.Config()
    keys = [f"D/{s}_{k}" for s in ("latent", "ref") for k in ("real", "fake", "reg")] + [
        f"G/{s}_{k}" for s in ("latent", "ref") for k in ("adv", "sty", "ds", "cyc")]
    line = widest_console_line(m.console_terms(cfg), keys + ["G/lambda_ds"], cfg.total_iters)
    # L_G = adv + λ_sty sty − λ_ds ds + λ_cyc cyc, with λ_ds the logged value (-0.0123 here)
    g = -0.0123 * (1 + cfg.lambda_sty + cfg.lambda_cyc) - (-0.0123) * (-0.0123)
    assert f" G {g:.3g} " in line


# ---------------------------------------------------------------------------- a cluster stops it
def test_stop_signal_saves_and_says_how_to_continue(tmp_path):
    """SIGUSR1, SLURM's warning before the time limit (sbatch --signal=USR1@s), saves like
    Ctrl-C: last.pt at the step reported, the log up to it, exit status 128 + signal number, and
    the command that continues the run."""
    out = tmp_path / "run"
    flags = ["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16", "--batch", "2"]
    flags += ["--num-workers", "2", "--log-every", "1", "--save-every", "100000", "--sample-every",
              "100000", "--total-iters", "100000", "--out", str(out)]
    # To the loader's workers too, as SLURM signals every process: the main process stops them.
    rc, text, err = stop_with_signal(["02_stargan_v2.py", *flags], signal.SIGUSR1, group=True)
    assert rc == 128 + signal.SIGUSR1, err[-3000:]
    step = int(re.search(r"stopped by SIGUSR1 at step (\d+)", text)[1])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == step >= 1
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    assert f"python 02_stargan_v2.py {' '.join(flags)} --resume auto" in text


def test_sample_names_and_skips_unreadable_src_files(tmp_path, capsys):
    """sample --src FOLDER: an unreadable file is named and skipped, as training does; the run
    fails (one line) only when no file is readable."""
    cfg = tiny_cfg(out=str(tmp_path))
    nets, ema = m.build_nets(cfg)
    save_checkpoint(tmp_path / "last.pt", 1, cfg, {k + "_ema": v for k, v in vars(ema).items()}, {})
    src = tmp_path / "src"
    src.mkdir()
    from PIL import Image
    for name in ("a.png", "c.png"):
        Image.new("RGB", (40, 30), (20, 90, 200)).save(src / name)
    write_unreadable(src / "b.png", "text")
    m.main(["sample", "--ckpt", str(tmp_path / "last.pt"), "--src", str(src), "--n-styles", "1"])
    assert f"warning: skipping {src / 'b.png'}: cannot read this image" in capsys.readouterr().err
    with Image.open(tmp_path / "sample" / "latent.png") as grid:  # the 2 readable sources
        # 2 columns of 32 px enlarged ×2 with 1 px padding, then the row titles on the left
        assert grid.height == 2 * 64 + 3 and 2 * 64 + 3 + 20 < grid.width < 3 * 64 + 4
    for name in ("a.png", "c.png"):
        write_unreadable(src / name, "empty")
    with pytest.raises(UserError, match=f"--src {src}: none of its 3 image"):
        m.main(["sample", "--ckpt", str(tmp_path / "last.pt"), "--src", str(src)])


# ---------------------------------------------------------------------------- small val splits
def spy_grids(monkeypatch, module):
    """Record every save_grid call of a script: {file name: (images, nrow, row labels)}."""
    grids, real = {}, module.save_grid

    def spy(images, path, nrow, rows=(), cols=()):
        grids[Path(path).name] = (images.detach().cpu().clone(), nrow, list(rows))
        real(images, path, nrow, rows, cols)
    monkeypatch.setattr(module, "save_grid", spy)
    return grids


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 2), (3, 3, 3), (1, 4, 3)])
def test_any_val_layout_gives_matching_grids(layout, tmp_path, monkeypatch, capsys):
    """Any val split the reader accepts: per domain up to 2 sources and 2 references; each
    reference row is labelled with its domain and shows an image of it; a domain with 1 image
    gives both and says so once. Once crashed with 3 per domain and misaligned with 1."""
    toy.write_scenes(tmp_path, 16, n_train=2, n_val=4, seed=0)
    domains = sorted(p.name for p in (tmp_path / "val").iterdir())
    for d, n in zip(domains, layout):
        for f in sorted((tmp_path / "val" / d).iterdir())[n:]:
            f.unlink()
    grids = spy_grids(monkeypatch, m)
    m.main(RUN + ["--data", str(tmp_path), "--img-size", "16", "--out", str(tmp_path / "run"),
                  "--total-iters", "1", "--batch", "2", "--num-workers", "0"])
    n_src = [min(2, (c + 1) // 2) for c in layout]
    n_ref = [min(2, c - s) or 1 for c, s in zip(layout, n_src)]
    N, R = sum(n_src), sum(n_ref)
    images, nrow, rows = grids["000001_cycle.png"]
    assert (len(images), nrow, len(rows)) == (4 * N, N, 4)
    images, nrow, rows = grids["000001_reference.png"]
    assert (len(images), nrow, len(rows)) == ((R + 1) * (N + 1), N + 1, R + 1)
    want = [d for d, n in zip(domains, n_ref) for _ in range(n)]
    assert [r.split()[-1] for r in rows[1:]] == want
    refs = images.view(R + 1, N + 1, *images.shape[1:])[1:, 0]  # first cell of each ref row
    assert [domains[k] for k in toy.read_scenes(refs)["domain"].tolist()] == want
    images, nrow, rows = grids["000001_latent_psi1.0.png"]
    assert (len(images), nrow, len(rows)) == ((1 + 3 * 5) * N, N, 1 + 3 * 5)
    out = capsys.readouterr().out
    for d, c in zip(domains, layout):
        assert out.count(f"val/{d} holds 1 image") == (c == 1), out


def test_toy_sample_grids_show_every_shape(tmp_path):
    """The grids' sources and references (val's first 2 + 2 per domain) hold every shape twice,
    read back by the oracle; the images after them are the random draws they always were."""
    toy.write_scenes(tmp_path, 32, n_train=1, n_val=6, seed=0)
    x, y = m.stack_split(tmp_path, "val", 32, per_domain=4)
    x_src, _, x_ref, _ = m.fixed_batch(x, y, toy.SCENES)
    for part in (x_src, x_ref):
        assert toy.read_scenes(part)["shape"].bincount(minlength=3).tolist() == [2, 2, 2]
    rng, later = random.Random(0), []
    for split, n in (("train", 1), ("val", 6)):
        for k in range(3):
            later += [toy.render_scene(k, 32, rng)[0] for _ in range(n)]
    ours = m.stack_split(tmp_path, "val", 32)[0]
    old = torch.stack(later[3:]) * 2 - 1  # the val images drawn as before (random shapes)
    keep = [k * 6 + i for k in range(3) for i in (4, 5)]
    assert (ours[keep] - old[keep]).abs().max() < 1 / 127  # PNG rounding

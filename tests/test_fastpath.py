"""The mixed-precision path of every script, on the CPU: `--amp` runs torch.autocast("cpu", bf16),
the same machinery as CUDA's default. From the same weights, batch and random draws, one training
iteration with autocast logs every loss term within 3 % (relative) or 2e-3 (absolute) of the fp32
iteration, the penalties stay finite and non-zero, and a tensor inside the step is really bf16."""
import copy
import dataclasses
import re

import pytest
import torch

import common
from conftest import build_all, load_script

TOL_REL, TOL_ABS = 0.03, 2e-3


def first_conv(net):
    """The first module holding a conv weight (B, C, k, k): nn.Conv2d or an equalised-lr conv."""
    return next(m for m in net.modules() if getattr(m, "weight", None) is not None
                and m.weight.dim() == 4)


def run_twice(step, nets, cfg):
    """step(nets, cfg) -> {term: tensor}: once in fp32 (amp False), once with --amp, from copies
    of the same nets and the same RNG state; returns both logs and the dtypes a D conv produced."""
    logs, seen = [], []
    for amp in (False, True):
        twin = copy.deepcopy(nets)
        torch.manual_seed(123)
        d = twin["D"]
        hook = first_conv(d).register_forward_hook(lambda m, i, o: seen.append((amp, o.dtype)))
        logs.append({k: float(v) for k, v in step(twin, dataclasses.replace(cfg, amp=amp)).items()})
        hook.remove()
    return logs, seen


def assert_close(logs, seen, penalties):
    fp32, bf16 = logs
    assert fp32.keys() == bf16.keys()
    for k in fp32:
        assert abs(bf16[k] - fp32[k]) <= max(TOL_REL * abs(fp32[k]), TOL_ABS), (k, fp32[k], bf16[k])
    for k in penalties:  # a gradient penalty that bf16 zeroed or blew up would show here
        assert 0 < abs(bf16[k]) < float("inf") and 0 < abs(fp32[k]), k
    assert {dt for amp, dt in seen if not amp} == {torch.float32}
    assert {dt for amp, dt in seen if amp} == {torch.bfloat16}  # autocast was really on


def diffs(logs):
    return {k: f"{logs[0][k]:.4g} {logs[1][k] - logs[0][k]:+.2g}" for k in logs[0]}


def test_autocast_modes():
    cpu, on = torch.device("cpu"), torch.bfloat16
    with common.autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")  # default: the CPU stays fp32
    with common.autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == on
    with common.autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")


def test_01_stargan_v1_fast_path():
    S = load_script("01_stargan_v1")
    cfg = S.Config(img_size=32, g_conv_dim=8, d_conv_dim=8, g_repeat_num=2, d_repeat_num=4)
    G, D, opt_g, opt_d = build_all(S, cfg, [5], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    c = (torch.rand(4, 5, generator=g) > 0.5).float()

    def step(n, c_):
        return {**S.d_step(n["G"], n["D"], n["opt_d"], x, c, c.flip(0), c_),
                **S.g_step(n["G"], n["D"], n["opt_g"], x, c, c.flip(0), c_)}
    logs, seen = run_twice(step, dict(G=G, D=D, opt_g=opt_g, opt_d=opt_d), cfg)
    print("01 |bf16 - fp32|:", diffs(logs))
    assert_close(logs, seen, ["D/gp"])


def test_02_stargan_v2_fast_path():
    m = load_script("02_stargan_v2")
    cfg = m.Config(img_size=32, dim_in=16, max_conv_dim=32, mapping_dim=32, num_domains=3,
                   batch=4, ds_iter=10)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.rand(4, 3, 32, 32, generator=g) * 2 - 1  # noqa: E731
    batch = (x(), torch.tensor([0, 1, 2, 0]), x(), x(), torch.tensor([1, 2, 0, 2]))

    def step(n, c_):
        logs = m.train_step(n["nets"], n["ema"], n["optims"], batch, 0, c_)
        return {k: v for k, v in logs.items() if k != "G/lambda_ds"}
    logs, seen = run_twice(step, dict(nets=nets, ema=ema, optims=optims, D=nets.D), cfg)
    print("02 |bf16 - fp32|:", diffs(logs))
    assert_close(logs, seen, ["D/latent_reg", "D/ref_reg"])


def test_03_bicyclegan_fast_path():
    bg = load_script("03_bicyclegan_latent")
    cfg = bg.Config(ngf=8, nef=8, ndf=8, img_size=64, batch=4, num_workers=0)
    cpu = torch.device("cpu")
    nets = bg.build_nets(cfg, cpu)
    opts = bg.build_optims(nets, cfg)
    g = torch.Generator().manual_seed(0)
    A, B = torch.rand(4, 1, 64, 64, generator=g) * 2 - 1, torch.rand(4, 3, 64, 64, generator=g)

    def step(n, c_):
        return bg.train_step(n["nets"], n["opts"], A, B * 2 - 1, c_, cpu)
    logs, seen = run_twice(step, dict(nets=nets, opts=opts, D=nets.D), cfg)
    print("03 |bf16 - fp32|:", diffs(logs))
    assert_close(logs, seen, [])


def test_04_stylegan_fast_path():
    m = load_script("04_stylegan_mapping")
    cfg = dataclasses.replace(m.Config(), img_size=16, w_dim=32, fmap_base=128, fmap_max=32,
                              batch=4)
    cpu = torch.device("cpu")
    G, D, _, opt_G, opt_D = build_all(m, cfg, cpu)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def step(n, c_):
        return {**m.d_step(n["G"], n["D"], n["opt_D"], x, c_),
                **m.g_step(n["G"], n["D"], n["opt_G"], 4, c_, cpu)}
    logs, seen = run_twice(step, dict(G=G, D=D, opt_G=opt_G, opt_D=opt_D), cfg)
    print("04 |bf16 - fp32|:", diffs(logs))
    assert_close(logs, seen, ["D/r1"])


def test_compiled_and_eager_forward_agree():
    """--compile (torch.compile with the C++ inductor backend on the CPU) changes no value and no
    state_dict name: G compiled in place vs its eager EMA twin, which starts with equal weights."""
    m = load_script("02_stargan_v2")
    cfg = m.Config(img_size=16, dim_in=8, max_conv_dim=16, mapping_dim=16, compile=True)
    nets, ema = m.build_nets(cfg)
    assert nets.G._compiled_call_impl is not None and ema.G._compiled_call_impl is None
    assert list(nets.G.state_dict()) == list(ema.G.state_dict())  # no "_orig_mod." prefixes
    x, s = torch.randn(2, 3, 16, 16), torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(nets.G(x, s), ema.G(x, s), atol=1e-5)


BENCH_FLAGS = {
    "01_stargan_v1": ["--preset", "toy", "--img-size", "16", "--g-conv-dim", "4", "--d-conv-dim",
                      "4", "--g-repeat-num", "1", "--d-repeat-num", "3"],
    "02_stargan_v2": ["--dim-in", "8", "--max-conv-dim", "16", "--batch", "2"],
    "03_bicyclegan_latent": ["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "2"],
    "04_stylegan_mapping": ["--img-size", "16", "--w-dim", "16", "--fmap-base", "64",
                            "--fmap-max", "16", "--batch", "4", "--num-workers", "0"],
}


@pytest.mark.parametrize("script", sorted(BENCH_FLAGS))
def test_bench_line_has_three_significant_digits(script, capsys):
    """Slow settings (the CPU at 256 px) once printed '0.01 it/s | 0.0 images/s': every figure
    keeps 3 significant digits, however small or large."""
    load_script(script).main(["--bench", "--bench-iters", "1", *BENCH_FLAGS[script]])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bench")][-1]
    for unit in ("it/s", "images/s", "TFLOP/s"):
        number = re.search(r"([0-9.e+-]+) " + re.escape(unit), line).group(1)
        assert float(number) > 0 and common.sig3(float(number)) == number, (unit, line)


def test_sig3():
    assert [common.sig3(x) for x in (0.012345, 4.5678, 78.94, 2163.7, 0.0, 1.0)] == \
        ["0.0123", "4.57", "78.9", "2164", "0", "1.00"]

"""The fake-CUDA tier: every script's CUDA paths, on a machine without a GPU.

torch's FakeTensorMode makes tensors that claim cuda:0: they carry shapes, dtypes and devices but
no data. Once autocast believes CUDA is there, torch.autocast("cuda") applies CUDA's bf16 rules to
them, so a dtype clash under CUDA's autocast fails here as it would on a GPU. Stricter than torch:
no op may mix a CPU tensor and a CUDA tensor at all, not even a 0-dim CPU one (torch 2.4, which
requirements.txt allows, refuses some of those, e.g. lerp's weight; and every one is a bug).

Covered, for every preset at its real size, bf16 autocast on and off (02: channels_last too):
- the training iteration through the scripts' own step functions: the random draws, G, D, E and
  F forwards, the FAN's masks (02 CelebA-HQ), every loss term (each must be fp32 on cuda:0), the
  R1 / WGAN-GP penalty's forward, the EMA update, the optimizers' calls;
- the sample grids, 04's figures, and the eval backbones' forwards (Inception, LPIPS).
Not covered: backward passes (the autograd engine needs a real GPU, so Tensor.backward and
torch.autograd.grad are replaced by checks that the loss is an fp32 scalar on cuda:0; grad gives
zeros shaped like its inputs; a 0-dim CPU draw the host reads, 04's style-mixing coin and
crossover, is a real number), optimizer arithmetic (no gradient reaches it), the kernels, speed,
memory, and whatever reads values (.item(), the toy oracle, writing PNGs): `pytest -m cuda` on a
GPU checks those."""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import common
from data import fan as data_fan
from data import metrics
from conftest import build_all, load_script

CUDA = torch.device("cuda", 0)
# Where CPU meets CUDA on purpose: copies, and index tensors (x[:, [0, 2]] makes a CPU one)
# and fill_ (x[:, idx] = 0 hands it the 0 as a CPU scalar tensor)
ALLOWED = (torch.ops.aten.copy_, torch.ops.aten._to_copy, torch.ops.aten.index,
           torch.ops.aten.index_put_, torch.ops.aten.index_put, torch.ops.aten.fill_)


class NoDeviceMix(TorchDispatchMode):
    """Every op below must keep to one device; copies and index tensors excepted."""
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinds = {t.device.type for t in pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}
        if {"cpu", "cuda"} <= kinds and func.overloadpacket not in ALLOWED:
            raise RuntimeError(f"{func}: a CPU tensor meets a CUDA tensor")
        return func(*args, **kwargs)


def checked_backward(loss, *args, **kwargs):
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.is_cuda, (
        f"backward of a {loss.dtype} {tuple(loss.shape)} tensor on {loss.device}")


def checked_grad(outputs, inputs, *args, **kwargs):
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    assert all(o.dtype == torch.float32 and o.is_cuda for o in outputs), "grad of a non-fp32 sum"
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    return tuple(torch.zeros_like(x) for x in inputs)


@pytest.fixture
def gpu(monkeypatch):
    """-> enter(): a context in which tensors made on CUDA are fake, autocast believes in CUDA,
    and no op mixes devices; and to_gpu(module): its parameters and buffers moved there."""
    mode = FakeTensorMode()
    # What torch.autocast("cuda") asks (torch.cuda.is_available itself stays False: with it
    # True, fake CUDA tensors would start the real CUDA runtime)
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    monkeypatch.setattr(torch.Tensor, "backward", checked_backward)
    monkeypatch.setattr(torch.autograd, "grad", checked_grad)
    for name in ("rand", "randint"):  # a 0-dim CPU draw the host reads (04's mixing coin)
        real = getattr(torch, name)

        def draw(*args, _real=real, **kwargs):
            if args[-1] == () and kwargs.get("device") is None:
                with unset_fake_temporarily():
                    return _real(*args, **kwargs).item()  # a real number, as the host needs
            return _real(*args, **kwargs)
        monkeypatch.setattr(torch, name, draw)

    def to_gpu(*modules):
        """Modules built on the meta device (no data, no init cost) -> the same on fake cuda:0,
        strides (channels_last) kept. Optimizers must be built afterwards."""
        for module in modules:
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for k, t in store.items():
                        if t is None:
                            continue
                        fake = mode.from_tensor(t.detach())
                        with mode:
                            fake = fake.to(CUDA)
                        store[k] = nn.Parameter(fake, t.requires_grad) \
                            if isinstance(t, nn.Parameter) else fake
        return modules[0] if len(modules) == 1 else modules

    @contextlib.contextmanager
    def enter():
        with mode, NoDeviceMix():
            yield
    return SimpleNamespace(enter=enter, to_gpu=to_gpu)


@pytest.fixture
def grids(monkeypatch):
    """The grids and GIFs a script would write: checked (images on the GPU or moved to the CPU
    by the script, floats) and counted, not written."""
    seen = []

    def save(images, path, *a, **kw):
        images = images if isinstance(images, (list, tuple)) else [images]
        assert all(x.is_floating_point() for x in images), path
        seen.append(path)
    return seen, save


def check_terms(terms):
    for k, v in terms.items():
        assert v.dtype == torch.float32 and v.is_cuda, f"{k}: {v.dtype} on {v.device}"


AMP = [pytest.param(None, id="bf16"), pytest.param(False, id="fp32")]
META = torch.device("meta")


# ---------------------------------------------------------------------------- 01
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("preset", ["celeba", "toy"])
def test_stargan_v1(preset, amp, gpu, grids, monkeypatch):
    S = load_script("01_stargan_v1")
    cfg = S.Config(**{**S.PRESETS.get(preset, {}), "amp": amp})
    seen, save = grids
    monkeypatch.setattr(S, "save_grid", save)
    A, B, H = len(cfg.attrs), 2, cfg.img_size
    G, D, *_ = build_all(S, cfg, [A], META)
    G, D = gpu.to_gpu(G, D)
    with gpu.enter():
        opt_g, opt_d = (torch.optim.Adam(n.parameters(), fused=True) for n in (G, D))
        x = torch.rand(B, 3, H, H, device=CUDA) * 2 - 1
        c = (torch.rand(B, A, device=CUDA) > 0.5).float()
        check_terms(S.train_step(G, D, opt_g, opt_d, x, c, cfg.n_critic - 1, cfg))  # D and G
        sources = [SimpleNamespace(names=cfg.attrs, multi=True)]
        S.save_translations(G, x, c, sources, "sample.jpg")
    assert seen == ["sample.jpg"]


# ---------------------------------------------------------------------------- 02
@pytest.mark.parametrize("preset, amp, channels_last", [
    (p, amp, False) for p in ("afhq", "celeba_hq", "toy") for amp in (None, False)] + [
    ("afhq", None, True), ("celeba_hq", None, True)])  # NHWC: the CUDA speed-up, with bf16
def test_stargan_v2(preset, amp, channels_last, gpu, grids, monkeypatch):
    m = load_script("02_stargan_v2")
    cfg = m.Config(**{**m.PRESETS[preset], "amp": amp, "channels_last": channels_last})
    seen, save = grids
    monkeypatch.setattr(m, "save_grid", save)
    nets, ema = m.build_nets(cfg, META)
    fan = gpu.to_gpu(data_fan.FAN().to(META).eval()) if cfg.w_hpf > 0 else None
    gpu.to_gpu(*vars(nets).values(), *vars(ema).values())
    B, H, K = 2, cfg.img_size, cfg.num_domains
    with gpu.enter():
        optims = m.build_optims(nets, cfg)
        assert all(o.defaults["fused"] for o in optims.values())  # CUDA: fused Adam
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = [(torch.rand(B, 3, H, H, device=CUDA) * 2 - 1).contiguous(memory_format=fmt)
             for _ in range(3)]
        y = torch.randint(K, (2, B), device=CUDA)
        logs = m.train_step(nets, ema, optims, (x[0], y[0], x[1], x[2], y[1]), 7, cfg, fan)
        check_terms({k: v for k, v in logs.items() if k != "G/lambda_ds"})
        labels = [0, K - 1], [1, 0]  # read on the CPU by the loop (fixed_batch)
        m.write_samples(ema, (x[0], y[0], x[1], y[1]), common.Path("s"), "000001", cfg, fan,
                        labels=labels)
    names = {p.name for p in seen}
    assert {"000001_cycle.png", "000001_reference.png", "000001_latent_psi1.0.png"} <= names
    assert ("000001_masks.png" in names) == (fan is not None)


def test_eval_backbones(gpu):
    inception = gpu.to_gpu(metrics.InceptionPool(pretrained=False).to(META).eval())
    lpips = gpu.to_gpu(metrics.LPIPS("alex", pretrained=False).to(META).eval())
    vgg = gpu.to_gpu(metrics.LPIPS("vgg", pretrained=False).to(META).eval())  # 04's PPL
    with gpu.enter(), torch.no_grad():
        x = torch.rand(2, 3, 256, 256, device=CUDA) * 2 - 1
        assert inception(x).shape == (2, 2048) and inception(x).is_cuda
        assert lpips(x, x.flip(0)).shape[0] == 2 and vgg(x, x.flip(0)).is_cuda


# ---------------------------------------------------------------------------- 03
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("preset", ["edges2shoes", "toy"])
def test_bicyclegan(preset, amp, gpu, grids, monkeypatch):
    bg = load_script("03_bicyclegan_latent")
    cfg = bg.Config(**{**bg.PRESETS[preset], "amp": amp})
    seen, save = grids
    monkeypatch.setattr(bg, "save_grid", save)
    monkeypatch.setattr(bg, "save_gif", save)
    nets = bg.build_nets(cfg, META)
    gpu.to_gpu(*vars(nets).values())
    B, H = 2, cfg.img_size
    with gpu.enter():
        opts = bg.build_optims(nets, cfg)
        flip = torch.rand(B) < 0.5  # the loader's CPU batch, moved and flipped by to_pair
        A, Bimg = bg.to_pair((torch.rand(B, cfg.input_nc, H, H), torch.rand(B, 3, H, H)), cfg,
                             CUDA, flip)
        check_terms(bg.train_step(nets, opts, A, Bimg, cfg, CUDA))
        z = torch.randn(3, cfg.nz).to(CUDA)
        bg.sample_grid(nets, A, Bimg, z, "grid.png")
        bg.z_interp_gif(nets.G, A, cfg.nz, "z.gif")
        assert bg.random_outputs(nets.G, A, cfg.nz, 3).shape == (B, 3, 3, H, H)
    assert seen == ["grid.png", "z.gif"]


# ---------------------------------------------------------------------------- 04
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("preset", ["afhq", "celeba", "toy"])
def test_stylegan(preset, amp, gpu, grids, monkeypatch, tmp_path):
    sg = load_script("04_stylegan_mapping")
    cfg = sg.Config(**{**sg.PRESETS[preset], "amp": amp})
    seen, save = grids
    monkeypatch.setattr(sg, "save_grid", save)
    monkeypatch.setattr(sg, "save_gif", save)
    G, D, G_ema, *_ = build_all(sg, cfg, META)
    gpu.to_gpu(G, D, G_ema)
    with gpu.enter():
        opt_G, opt_D = (torch.optim.Adam(n.parameters(), fused=True) for n in (G, D))
        x = torch.rand(2, 3, cfg.img_size, cfg.img_size, device=CUDA) * 2 - 1
        check_terms(sg.d_step(G, D, opt_D, x, cfg) | sg.g_step(G, D, opt_G, 2, cfg, CUDA))
        sg.ema_update(G_ema, G, cfg)
        with torch.no_grad():
            assert G_ema(torch.randn(4, cfg.w_dim).to(CUDA)).is_cuda  # the sample grid
            if preset == "toy":  # the figures at one size: ~250 passes of g
                assert sg.figures(G_ema.eval(), cfg, tmp_path, CUDA) == seen and len(seen) == 5


# ---------------------------------------------------------------------------- the tier's teeth
def test_the_tier_catches_a_cpu_tensor_in_a_cuda_path(gpu):
    """The defect this tier was built for: a torch.linspace made without a device (on the CPU)
    used as lerp's weight on the GPU, as 04's figures once did."""
    with gpu.enter():
        a, b = torch.randn(4, 8, device=CUDA), torch.randn(4, 8, device=CUDA)
        assert torch.lerp(a, b, 0.5).is_cuda  # a Python float is fine
        for t in torch.linspace(0, 1, 24):  # 0-dim CPU weights: recent torch lets them pass
            with pytest.raises(RuntimeError, match="CPU tensor meets a CUDA tensor"):
                torch.lerp(a, b, t)
        with pytest.raises(RuntimeError, match="dtype|same|float|BFloat16|Half"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = nn.functional.linear(a, torch.randn(8, 8, device=CUDA))  # bf16 under autocast
            torch.lerp(h, a, 0.5)  # bf16 meets fp32 outside autocast: a dtype clash

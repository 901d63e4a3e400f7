"""A Style-Based Generator Architecture for Generative Adversarial Networks (Karras, Laine, Aila,
CVPR 2019, arXiv:1812.04948v3). Read beside §2 (mapping f, AdaIN Eq. (1), noise), §3 (mixing,
stochastic variation), §4.1 (PPL, Eqs. (2)-(3)), App. B (truncation), App. C (training).
Symbols: f → mapping; A → AdaIN.affine, y = (y_s, y_b); B → StyleLayer.noise_scale; g → synthesis;
w̄ → w_avg; ψ → psi; γ → r1_gamma. Shapes: B batch, Z = W latent size, L = 2·log2(R) − 2 layers.
  python 04_stylegan_mapping.py [--resume auto]   # toy shapes, 32 px, CPU minutes, figures
  python 04_stylegan_mapping.py --data data/afhq  # 256 px into runs/04_afhq (CelebA: 128 px)
  torchrun --nproc_per_node 8 04_stylegan_mapping.py --data data/afhq --batch 4  # 8 GPUs × 4
  python 04_stylegan_mapping.py sample --out runs/04_toy [--ckpt F]  # Figs. 3, 4, 8 + z/w GIFs
  python 04_stylegan_mapping.py eval --out runs/04_toy    # PPL in Z and W + toy oracle
  python 04_stylegan_mapping.py --bench           # one line: it/s, TFLOP/s
Builds on: 03's random latent z ~ N(0, I) as the source of diversity; here the mapping f turns z
into w, which reaches every layer of g through AdaIN instead of being concatenated to the input.
Expected: default toy run (1500 steps, 32 px; figures in runs/04_toy/): 85 % valid shapes;
B's coarse styles bring B's position in 78 % of mixes (chance 8 %), B's fine styles B's colour in
76 % (chance 6 %); ψ 1 → 0 shrinks the colour std 0.21 → 0 and the shape diversity 0.36 → 0
(real images 0.67); noise keeps shape and place in 99 %. Shape is half learnt: ovals and rounded
squares, B's coarse styles bring B's shape in 54 % (chance 49 %); `--resume auto --total-iters
4500` reaches a diversity of 0.43-0.55 and a coarse shape score of 0.46-0.80 (three seeds).
Params (1024 px): f 2,101,248, G 26,212,019, D 23,077,137.
Deviation: no progressive growing (ProGAN, StyleGAN start at 4×4 and fade in one resolution at a
time, as GANs then diverged at 1024 px from scratch); at 32-256 px R1 keeps a fixed-size StyleGAN
stable (StyleGAN2 dropped growing too), and growing would double the code. So G lacks the 7,608
to-RGB parameters that only growing uses (official 26,219,627)."""
import dataclasses
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import Subset
from torchvision.utils import make_grid


from common import (Logger, SaveTimer, UserError, autocast, average_gradients, check_finite,
                    check_flags, check_same_weights, check_save, flop_counter, init_distributed,
                    is_main, load_checkpoint, load_run, main_guard, mean_over_ranks, next_batch,
                    own_rng, parse_config, pick_device, prepare_run, print_summary, report_crash,
                    require, save_checkpoint, save_gif, save_grid, seed_everything, shard_draw,
                    sig3, start_line, world_size)
from data.datasets import ImageFiles, epoch_rows, make_loader, resolve_data, to_tensor_norm
from data.metrics import LPIPS
from data.toy import SHAPES, read_shapes

# ----------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data: str = ""  # image folder (all images below it or its train/); "" or "toy" -> shapes
    img_size: int = 256  # R, fixed training resolution (power of 2, 8..1024)
    out: str = "runs/04_stylegan"  # run folder (last.pt, samples, log.jsonl, figures)
    resume: str = ""  # "" fresh, "auto" out/last.pt if present, or a checkpoint path
    overwrite: bool = False  # allow a fresh run to replace out/last.pt
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # RNG seed
    w_dim: int = 512  # dimensionality of z and w (§2: 512)
    mapping_layers: int = 8  # depth of the mapping network f (§2: 8 FC layers)
    mapping_lr_mul: float = 0.01  # λ' = 0.01·λ for f (App. C: two orders of magnitude lower)
    fmap_base: int = 8192  # channels at 2^r px = min(fmap_base / 2^(r−1), fmap_max) (official)
    fmap_max: int = 512  # channel cap: 512 up to 32 px, then halving
    batch: int = 32  # minibatch per process (official 32 at 64-256 px); global: N × batch
    lr: float = 1e-3  # Adam λ (App. C; official FFHQ raises it at 128+ px, not done here)
    betas: tuple[float, ...] = (0.0, 0.99)  # Adam β1, β2 (App. C)
    r1_gamma: float = 10.0  # γ of the R1 penalty on reals (App. C, FFHQ)
    mixing_prob: float = 0.9  # style mixing regularisation probability p (§3.1, Table 2: 0.9)
    w_avg_beta: float = 0.995  # decay of the running average w̄ (official dlatent_avg_beta)
    ema_kimg: float = 10.0  # EMA of G: half-life in thousands of images (official)
    trunc_cutoff: int = 8  # truncate layers < cutoff only, i.e. 4-32 px (official)
    ppl_samples: int = 100_000  # latent pairs for PPL (§4.1: 100k)
    ppl_crop: bool = True  # crop to the central face before LPIPS (§4.1, FFHQ)
    oracle_samples: int = 1000  # generated images read by the toy oracle in eval
    total_iters: int = 400_000  # training steps (12.8M images; official FFHQ 25M)
    log_every: int = 100  # print/log every N steps
    sample_every: int = 2000  # save a sample grid every N steps
    save_every: int = 5000  # write last.pt every N steps
    save_minutes: float = 30.0  # and every N minutes of wall time (0: by steps only)
    num_workers: int = 4  # DataLoader workers
    amp: bool | None = None  # bf16 autocast: default CUDA only; --amp on the CPU too
    bench: bool = False  # time bench_iters training steps on random data instead of training
    compile: bool = False  # torch.compile G (D stays eager: R1's double backward)
    bench_iters: int = 20  # timed iterations for --bench


# Deviation (toy): widths 64-16, w 64-d and a 2 k-image EMA half-life so the default run takes
# CPU minutes; λ = 2e-3, twice App. C's: at 1e-3 the oracle read 56 % / 51 % of samples as a
# valid shape after 900 / 1200 steps, at 2e-3 95 % / 97 %. R1 γ 1, not App. C's 10 (FFHQ,
# 1024 px): at γ 10 G drew circles only. Shape diversity at 1500 steps, seeds 0 / 1 / 2, 1 thread:
# γ 1 0.49 / 0.13 / 0.10, γ 0.01 (near the StyleGAN2-ADA rule 0.0002·R²/B) 0.33 / 0.49 / 0.28.
# Batch 16 × 3000 steps, λ' = 0.1 λ, 2 mapping layers, 2× widths, 5× images, larger objects: no
# better. Objects centred at one size give 0.53 / 0.48 / 0.53, but then B's coarse styles bring B's
# shape in only 0.53-0.64 of mixes (chance 0.43-0.52). Time does it: trained on to 4500 steps (γ 1)
# seeds 0 / 1 / 2 reach 0.55 / 0.46 / 0.43, coarse → shape 0.46 / 0.80 / 0.80 (chance 0.34-0.62).
# f (8 layers, λ' = 0.01 λ), AdaIN, noise, mixing (p 0.9), R1, truncation: as the paper.
PRESETS = {
    "toy": dict(img_size=32, w_dim=64, fmap_base=256, fmap_max=64, lr=2e-3, r1_gamma=1.0,
                total_iters=1500, log_every=50, sample_every=500, save_every=500, num_workers=0,
                ppl_samples=2000, ppl_crop=False, ema_kimg=2.0, oracle_samples=500,
                out="runs/04_toy"),
    "afhq": dict(img_size=256, ppl_crop=False, out="runs/04_afhq"),
    "celeba": dict(img_size=128, out="runs/04_celeba"),
}
# Resume, sample and eval refuse a change of these (the weights would not fit); any other given
# flag is applied (common.run_config).
FIXED = ("data", "img_size", "w_dim", "mapping_layers", "fmap_base", "fmap_max")

# ----------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------
class EqualLR(nn.Module):
    """Equalized lr (ProGAN §4.1): weight stored ~N(0, 1), scaled at runtime by gain/√fan_in, so
    Adam moves all layers at one relative speed. k = 0: linear (B, c_in) -> (B, c_out); k: conv."""
    def __init__(self, c_in, c_out, k=0, gain=math.sqrt(2), bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, *((k, k) if k else ())))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        self.scale = gain / math.sqrt(self.weight[0].numel())  # fan_in = c_in·k·k

    def forward(self, x):
        w, b = self.weight * self.scale, self.bias
        return F.linear(x, w, b) if w.dim() == 2 else F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def pixel_norm(z):
    """z / √(mean(z²) + 1e-8) over features: every z lands on the sphere of radius √Z."""
    return z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)


def blur(x):
    """Depthwise [1,2,1]ᵀ[1,2,1]/16 low-pass around up/down-sampling (§2, official)."""
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], device=x.device, dtype=x.dtype) / 16
    return F.conv2d(x, k.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])


class MappingNetwork(nn.Module):
    """f: Z → W (§2, Fig. 1b): PixelNorm, then 8 × (FC + LReLU 0.2); ×0.01 lr: build_optims."""
    def __init__(self, w_dim=512, n_layers=8):
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(n_layers)
                                   for m in (EqualLR(w_dim, w_dim), nn.LeakyReLU(0.2))])

    def forward(self, z):
        """z (B, Z) -> w (B, W)."""
        return self.net(pixel_norm(z))


class AdaIN(nn.Module):
    """Eq. (1): AdaIN(x_i, y) = y_s,i (x_i − μ(x_i)) / σ(x_i) + y_b,i, where (y_s, y_b) = A(w)."""
    def __init__(self, channels, w_dim):
        super().__init__()
        self.affine = EqualLR(w_dim, 2 * channels, gain=1.0)  # A
        nn.init.ones_(self.affine.bias[:channels])  # y_s starts at 1 (official: 1 + y_s, same)

    def forward(self, x, w):
        """x (B, C, H, W), w (B, W) -> (B, C, H, W) with per-channel mean y_b and std |y_s|."""
        y_s, y_b = self.affine(w)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        x = x - x.mean((2, 3), keepdim=True)
        return y_s * x * torch.rsqrt(x.pow(2).mean((2, 3), keepdim=True) + 1e-8) + y_b


class StyleLayer(nn.Module):
    """One of the L layers of g: [up ×2 → conv 3×3 → blur] → + B·noise → + bias → LReLU → AdaIN.
    One 1-channel noise image per layer and B a plain parameter (official; rosinality differs)."""
    def __init__(self, c_in, c_out, w_dim, up=False, const=False):
        super().__init__()
        self.up = up
        self.conv = None if const else EqualLR(c_in, c_out, 3, bias=False)
        self.noise_scale = nn.Parameter(torch.zeros(1, c_out, 1, 1))  # B
        self.bias = nn.Parameter(torch.zeros(1, c_out, 1, 1))  # also after the constant (official)
        self.adain = AdaIN(c_out, w_dim)

    def forward(self, x, w, noise=None):
        """x (B, C_in, H, W), w (B, W), noise (B or 1, 1, H', W') or None -> (B, C_out, H', W')."""
        if self.up:
            x = blur(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")))  # (B, C, 2H, 2W)
        elif self.conv is not None:
            x = self.conv(x)
        noise = torch.randn_like(x[:, :1]) if noise is None else noise  # (B, 1, H', W')
        return self.adain(F.leaky_relu(x + self.noise_scale * noise + self.bias, 0.2), w)


class Synthesis(nn.Module):
    """g (Fig. 1b): learned 4×4 constant → 2 StyleLayers per resolution → to-RGB (1×1, linear)."""
    def __init__(self, img_size, w_dim, fmap_base, fmap_max):
        super().__init__()
        top, nf = int(math.log2(img_size)), lambda r: min(fmap_base >> r - 1, fmap_max)  # at 2^r px
        self.const = nn.Parameter(torch.ones(1, nf(2), 4, 4))  # official ones; rosinality randn
        layers = [StyleLayer(0, nf(2), w_dim, const=True), StyleLayer(nf(2), nf(2), w_dim)]
        for r in range(3, top + 1):  # 8×8 … R×R
            layers += [StyleLayer(nf(r - 1), nf(r), w_dim, up=True),
                       StyleLayer(nf(r), nf(r), w_dim)]
        self.layers = nn.ModuleList(layers)
        self.to_rgb = EqualLR(nf(top), 3, 1, gain=1.0)
        self.num_layers = len(layers)  # L = 2·log2(R) − 2

    def make_noise(self, batch, device):
        """One noise image per layer: [(batch, 1, 4, 4), (batch, 1, 4, 4), (batch, 1, 8, 8), …]."""
        return [torch.randn(batch, 1, 4 << i // 2, 4 << i // 2, device=device)
                for i in range(self.num_layers)]

    def forward(self, ws, noise=None):
        """ws (B, L, W), or w (B, W) for every layer; noise: L maps or None -> (B, 3, R, R) ≈ ±1"""
        if ws.dim() == 2:
            ws = ws[:, None].expand(-1, self.num_layers, -1)  # (B, L, W)
        x = self.const.repeat(ws.shape[0], 1, 1, 1)  # (B, 512, 4, 4); expand trips FlopCounterMode
        for i, layer in enumerate(self.layers):  # 4×4 → R×R
            x = layer(x, ws[:, i], None if noise is None else noise[i])
        return self.to_rgb(x)  # (B, 3, R, R), linear


def style_mix(ws1, ws2, crossover):
    """§3.1: layers before `crossover` keep w1, the rest take w2. ws (B, L, W)."""
    layer = torch.arange(ws1.shape[1], device=ws1.device)[None, :, None]  # (1, L, 1)
    return torch.where(layer < crossover, ws1, ws2)


class Generator(nn.Module):
    """f + g + the running average w̄ (a buffer: saved and copied into the EMA, never trained)."""
    def __init__(self, cfg):
        super().__init__()
        self.mapping = MappingNetwork(cfg.w_dim, cfg.mapping_layers)
        self.synthesis = Synthesis(cfg.img_size, cfg.w_dim, cfg.fmap_base, cfg.fmap_max)
        self.register_buffer("w_avg", torch.zeros(cfg.w_dim))

    def styles(self, z, psi=1.0, cutoff=None):
        """z (B, Z) -> ws (B, L, W); App. B truncation w' = w̄ + ψ(w − w̄) on layers < cutoff."""
        ws = self.mapping(z)[:, None].expand(-1, self.synthesis.num_layers, -1)  # (B, L, W)
        if psi == 1:
            return ws
        w_trunc = torch.lerp(self.w_avg.to(ws.dtype).expand_as(ws), ws, psi)  # (B, L, W)
        return w_trunc if cutoff is None else style_mix(w_trunc, ws, cutoff)  # w' below cutoff

    def forward(self, z, psi=1.0, cutoff=None, noise=None):
        """z (B, Z) -> images (B, 3, R, R)."""
        return self.synthesis(self.styles(z, psi, cutoff), noise)

    def mixed_styles(self, z, z2=None, crossover=None):
        """§3.1 style mixing regularisation: w = f(z) for every layer, but from `crossover` on
        f(z2) takes over (z2 None: no mixing). z, z2 (B, Z) -> ws (B, L, W), w (B, W)."""
        w = self.mapping(z)  # (B, W)
        ws = w[:, None].expand(-1, self.synthesis.num_layers, -1)  # (B, L, W)
        return (ws if z2 is None else style_mix(ws, self.mapping(z2)[:, None], crossover)), w

    @torch.no_grad()
    def update_w_avg(self, w_mean, beta):
        """App. B: the running average w̄ ← β w̄ + (1 − β) mean_batch f(z); w_mean (W,)."""
        self.w_avg.lerp_(w_mean.to(self.w_avg.dtype), 1 - beta)


def minibatch_stddev(x, group=4):
    """ProGAN §3: std of each feature over a group of 4 (official; rosinality: the whole batch),
    averaged into one extra channel. Sample b is in group b mod (B/4). Under torchrun groups form
    within each process's batch (B = --batch), as in the official multi-GPU code (per GPU)."""
    B, C, H, W = x.shape
    G = min(group, B)
    if B % G:
        raise ValueError(f"batch {B}: not a multiple of the minibatch-stddev group ({group})")
    y = x.float().reshape(G, -1, C, H, W)  # (G, B/G, C, H, W)
    y = (y - y.mean(0)).pow(2).mean(0).add(1e-8).sqrt().mean((1, 2, 3))  # (B/G,)
    return torch.cat([x, y.to(x.dtype).repeat(G)[:, None, None, None].expand(B, 1, H, W)], 1)


class Discriminator(nn.Module):
    """Official D: from-RGB 1×1; per resolution conv 3×3 → blur → conv 3×3 (widens) → avg-pool; at
    4×4 minibatch stddev → conv 3×3 → FC → FC (gain 1) -> a logit."""
    def __init__(self, img_size, fmap_base, fmap_max, mbstd_group=4):
        super().__init__()
        top, nf = int(math.log2(img_size)), lambda r: min(fmap_base >> r - 1, fmap_max)
        self.from_rgb, self.mbstd_group = EqualLR(3, nf(top), 1), mbstd_group
        self.blocks = nn.ModuleList([nn.ModuleList([EqualLR(nf(r), nf(r), 3),
                                                    EqualLR(nf(r), nf(r - 1), 3)])
                                     for r in range(top, 2, -1)])  # R×R → 8×8
        self.conv, self.fc = EqualLR(nf(2) + 1, nf(2), 3), EqualLR(nf(2) * 16, nf(1))
        self.out = EqualLR(nf(1), 1, gain=1.0)

    def forward(self, x):
        """x (B, 3, R, R) in [-1, 1] -> logits (B,)."""
        h = F.leaky_relu(self.from_rgb(x), 0.2)  # (B, C, R, R)
        for conv0, conv1 in self.blocks:  # R×R → 4×4
            h = F.leaky_relu(conv0(h), 0.2)
            h = F.leaky_relu(F.avg_pool2d(conv1(blur(h)), 2), 0.2)  # (B, C', H/2, W/2)
        h = F.leaky_relu(self.conv(minibatch_stddev(h, self.mbstd_group)), 0.2)  # (B, 512, 4, 4)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)  # (B, 512)
        return self.out(h).squeeze(1)  # (B,)


# ----------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------
def d_logistic(real_logits, fake_logits):
    """Non-saturating logistic loss (App. C, FFHQ), D side: softplus(D(G(z))) + softplus(−D(x))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def g_nonsaturating(fake_logits):
    """Non-saturating logistic loss, G side: softplus(−D(G(z))) = −log σ(D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def r1_reg(real_logits, x_real):
    """R1 (Mescheder et al. 2018): E‖∇_x D(x)‖² on reals; the caller weights it by γ/2."""
    (grad,) = torch.autograd.grad(real_logits.sum(), x_real, create_graph=True)
    return grad.float().pow(2).sum((1, 2, 3)).mean()


# ----------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------
def make_dataset(cfg):
    """Every image below --data (below its train/ if any); short side → R, centre crop."""
    root = resolve_data(cfg.data, "shapes", cfg.img_size)
    root = root / "train" if (root / "train").is_dir() else root
    return ImageFiles(root, T.Compose([T.Resize(cfg.img_size, antialias=True),
                                       T.CenterCrop(cfg.img_size), to_tensor_norm()]))


def real_batches(dataset, cfg, device, step):
    """Endless x_real (B, 3, R, R) from `step` on, randomly mirrored (official mirror_augment);
    order and flips are pure functions of (seed, step), so a resumed run sees the same data;
    under torchrun each process takes its rows of every global batch (datasets.epoch_rows)."""
    n, b = len(dataset), cfg.batch
    per_epoch, mine = epoch_rows(n, b)
    while True:
        epoch, skip = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        order, flip = torch.randperm(n, generator=g), torch.rand(n, generator=g) < 0.5
        order, flip = order[mine], flip[mine]
        loader = make_loader(Subset(dataset, order[skip * b:].tolist()), b, shuffle=False,
                             num_workers=cfg.num_workers, device=device)
        for i, x in enumerate(loader, skip):
            x = x.to(device, non_blocking=True)  # from pinned memory: flip after the copy
            f = flip[i * b:(i + 1) * b, None, None, None].to(device, non_blocking=True)
            yield torch.where(f, x.flip(3), x)
            step += 1


# ----------------------------------------------------------------------------
# 5. Steps
# ----------------------------------------------------------------------------
def draw_latents(G, batch, cfg, device):
    """A G pass's randomness, all of it drawn here: z; with probability p a second latent z2 and a
    crossover layer in [1, L), one per minibatch (§3.1, official; rosinality: per block); the noise
    images. Under torchrun this process's rows of the global batch's draws (common.shard_draw),
    so N × B train as one × N·B. z, z2 (B, Z); noise: L maps (B, 1, H, W)."""
    z = shard_draw(lambda n: torch.randn(n, cfg.w_dim, device=device), batch)
    z2 = crossover = None
    if torch.rand(()) < cfg.mixing_prob:  # CPU generator: no GPU sync, restored on resume
        z2 = shard_draw(lambda n: torch.randn(n, cfg.w_dim, device=device), batch)
        crossover = int(torch.randint(1, G.synthesis.num_layers, ()))
    return z, z2, crossover, shard_draw(lambda n: G.synthesis.make_noise(n, device), batch)


def d_step(G, D, opt_D, x_real, cfg):
    """logistic loss + γ/2·R1 on reals; updates D only (G runs without gradients)."""
    x_real = x_real.detach().requires_grad_(True)
    with autocast(x_real.device, cfg.amp):
        with torch.no_grad():
            z, z2, crossover, noise = draw_latents(G, x_real.shape[0], cfg, x_real.device)
            x_fake = G.synthesis(G.mixed_styles(z, z2, crossover)[0], noise)  # (B, 3, R, R)
        real_logits, fake_logits = D(x_real).float(), D(x_fake).float()  # (B,)
    loss_adv, loss_r1 = d_logistic(real_logits, fake_logits), r1_reg(real_logits, x_real)
    opt_D.zero_grad(set_to_none=True)
    (loss_adv + cfg.r1_gamma / 2 * loss_r1).backward()
    average_gradients(opt_D)  # torchrun: the global batch's gradient
    opt_D.step()
    return {"D/adv": loss_adv.detach(), "D/r1": loss_r1.detach()}


def g_step(G, D, opt_G, batch, cfg, device):
    """Non-saturating loss on style-mixed fakes, updates G (f and g); then w̄ ← lerp(w̄, mean f(z),
    1 − β). Official updates w̄ in the D pass too; we don't, so the D step leaves G untouched."""
    D.requires_grad_(False)  # no D weight gradients: faster, and D cannot change
    with autocast(device, cfg.amp):
        z, z2, crossover, noise = draw_latents(G, batch, cfg, device)
        ws, w = G.mixed_styles(z, z2, crossover)  # (B, L, W), (B, W)
        loss = g_nonsaturating(D(G.synthesis(ws, noise)).float())
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(opt_G)  # torchrun: the global batch's gradient
    opt_G.step()
    D.requires_grad_(True)
    G.update_w_avg(mean_over_ranks(w.detach().float().mean(0)), cfg.w_avg_beta)  # global batch
    return {"G/adv": loss.detach()}


@torch.no_grad()
def ema_update(G_ema, G, cfg):
    """Official EMA of G, half-life ema_kimg k images (β ≈ 0.9978 at batch 32); w̄ is copied.
    The images of a step: the global batch, N processes × batch under torchrun."""
    beta = 0.5 ** (cfg.batch * world_size() / (cfg.ema_kimg * 1000))
    torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)
    G_ema.w_avg.copy_(G.w_avg)


def build_nets(cfg, device):
    """nets.G, nets.D, and nets.G_ema: a copy of G (sampling and the figures use it)."""
    G, G_ema = Generator(cfg).to(device), Generator(cfg).to(device).requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    D = Discriminator(cfg.img_size, cfg.fmap_base, cfg.fmap_max).to(device)
    if cfg.compile:  # in place: the state_dict keeps its names; G_ema (sampling) stays eager
        G.mapping.compile()  # the steps call f and g directly, never G.forward
        G.synthesis.compile()
    return SimpleNamespace(G=G, D=D, G_ema=G_ema)


def build_optims(nets, cfg):
    """Adam for G and D, f at lr × mapping_lr_mul as a param group (rosinality; official scales
    inside f's layers: the same under Adam, but ours keeps weights ~N(0, 1))."""
    G, fused = nets.G, next(nets.G.parameters()).is_cuda or None
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=1e-8, fused=fused)
    opt_G = torch.optim.Adam([{"params": G.synthesis.parameters()}, {
        "params": G.mapping.parameters(), "lr": cfg.lr * cfg.mapping_lr_mul}], **kw)
    return {"G": opt_G, "D": torch.optim.Adam(nets.D.parameters(), **kw)}


# ----------------------------------------------------------------------------
# 6. Sampling
# ----------------------------------------------------------------------------
def interpolate(G, z0, z1, t, space):
    """w (B, W) at t between z0, z1 (B, Z): slerp in Z, then f (official); lerp of f(z) in W."""
    if space == "w":
        return torch.lerp(G.mapping(z0), G.mapping(z1), t)
    a, b = F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1, 1)  # (B, 1)
    angle, ortho = t * cos.acos(), F.normalize(b - cos * a, dim=-1)  # ortho ⊥ a, in plane (a, b)
    return G.mapping(a * angle.cos() + ortho * angle.sin())


def style_bands(L):
    """Layer ranges [lo, hi) of the coarse, middle and fine styles. §3.1: coarse 4²-8² px (layers
    0-3), middle 16²-32² (4-7), fine 64²-1024² (8+). Deviation (toy): a 32 px g has no fine layers
    by that count, so below 64 px (L < 10) fine = the last resolution, middle = the one before,
    coarse = the rest (32 px: 4-8 / 16 / 32 px; 16 px: 4 / 8 / 16 px)."""
    if L >= 10:
        return (0, 4), (4, 8), (8, L)
    return (0, max(2, L - 4)), (max(2, L - 4), L - 2), (L - 2, L)


def with_band(ws_a, ws_b, band):
    """ws_a with the layers in band = (lo, hi) taken from ws_b (Fig. 3's rows)."""
    return style_mix(ws_a, style_mix(ws_b, ws_a, band[1]), band[0])


@torch.no_grad()
def figures(G, cfg, out, device):
    """Fig. 8 truncation (columns ψ, official cutoff), Fig. 3 style mixing, Fig. 4 stochastic
    variation + per-pixel std, GIFs of slerp in Z vs lerp in W. Noise fixed except in Fig. 4.
    Returns the paths written."""
    gen, R = torch.Generator().manual_seed(cfg.seed), cfg.img_size
    randn = lambda n: torch.randn(n, cfg.w_dim, generator=gen).to(device)  # noqa: E731
    noise, z, psis = G.synthesis.make_noise(1, device), randn(6), (1.0, 0.7, 0.5, 0.0, -0.5)
    x = torch.stack([G(z, psi, cfg.trunc_cutoff, noise) for psi in psis], 1)  # (6, 5, 3, R, R)
    paths = [out / n for n in ("truncation.png", "style_mixing.png", "stochastic_variation.png",
                               "interpolation_z.gif", "interpolation_w.gif")]
    save_grid(x.flatten(0, 1), paths[0], len(psis), cols=[f"psi {psi}" for psi in psis])
    # Fig. 3 (official rows, untruncated): top row = sources A; rows copy the coarse ×3, middle ×2
    # or fine ×1 styles of their source B (left) into every A (empty bands are left out)
    ws_a, ws_b = G.styles(randn(5)), G.styles(randn(6))
    bands = dict(zip(("coarse", "middle", "fine"), style_bands(G.synthesis.num_layers)))
    picks = [n for n in ["coarse"] * 3 + ["middle"] * 2 + ["fine"] if bands[n][0] < bands[n][1]]
    rows = [torch.full((1, 3, R, R), -1.0, device=device), G.synthesis(ws_a, noise)]
    for j, name in enumerate(picks):
        ws = with_band(ws_a, ws_b[j:j + 1], bands[name])  # (5, L, W): B's styles in [lo, hi)
        rows += [G.synthesis(ws_b[j:j + 1], noise), G.synthesis(ws, noise)]
    px = lambda lo, hi: "-".join(dict.fromkeys(f"{4 << i // 2}" for i in (lo, hi - 1)))  # noqa
    save_grid(torch.cat(rows), paths[1], 6,
              rows=["sources A"] + [f"B's {n} ({px(*bands[n])} px)" for n in picks])
    ws = G.styles(z[:3])  # Fig. 4: one w each, 100 noise draws -> x (100, 3, 3, R, R)
    x = torch.stack([G.synthesis(ws) for _ in range(100)])
    std = x.std(0).mean(1, keepdim=True)  # (3, 1, R, R)
    std = (std / std.amax((2, 3), keepdim=True).clamp(min=1e-8) * 2 - 1).expand(-1, 3, -1, -1)
    save_grid(torch.cat([x[:4].transpose(0, 1), std[:, None]], 1).flatten(0, 1), paths[2], 5,
              cols=["noise 1", "noise 2", "noise 3", "noise 4", "pixel std"])
    z0, z1, ts = randn(4), randn(4), [i / 23 for i in range(24)]  # floats: any device
    for space, path in zip("zw", paths[3:]):  # the same endpoints; §4.1: W should be smoother
        xs = [G.synthesis(interpolate(G, z0, z1, t, space), noise).cpu() for t in ts]
        save_gif([make_grid(x, 4, pad_value=-1) for x in xs], path)
    return paths


@torch.no_grad()
def ppl(G, lpips, space, cfg, device, eps=1e-4, batch=16):
    """§4.1 Eqs. (2)-(3), 'full': E[d(g(l(t)), g(l(t + ε))) / ε²], t ~ U(0, 1), l = slerp in Z or
    lerp in W, d = LPIPS-VGG16; noise fixed per minibatch; keep the 1-99 % percentiles (official)"""
    dists = []
    for _ in range(math.ceil(cfg.ppl_samples / batch)):
        z0, z1 = torch.randn(2, batch, cfg.w_dim, device=device)
        t = torch.rand(batch, 1, device=device)
        w = torch.cat([interpolate(G, z0, z1, s, space) for s in (t, t + eps)])  # (2B, W)
        x = G.synthesis(w, G.synthesis.make_noise(1, device))  # (2B, 3, R, R)
        c = x.shape[2] // 8  # the paper's face crop: rows 3/8..7/8, columns 2/8..6/8
        x = x[:, :, 3 * c:7 * c, 2 * c:6 * c] if cfg.ppl_crop else x
        x = F.avg_pool2d(x, max(x.shape[2] // 256, 1))  # box-downsample to 256 if larger
        dists.append(lpips(*x.float().chunk(2)) / eps ** 2)  # (B,)
    d = torch.cat(dists)[: cfg.ppl_samples].cpu()
    lo, hi = torch.quantile(d, torch.tensor([0.01, 0.99]))
    return d[(d >= lo) & (d <= hi)].mean().item()


@torch.no_grad()
def oracle_scores(G, cfg, device):
    """Not in paper (toy data): share of generated images the oracle reads as one valid object; on
    valid ones, domain shares and factor means [fake, real] and their mean |fake − real|."""
    data, n = make_dataset(cfg), cfg.oracle_samples
    z = torch.randn(n, cfg.w_dim).split(50)
    fake = read_shapes(torch.cat([G(zb.to(device)).cpu() for zb in z]))  # factors, (n, ...) each
    real = read_shapes(torch.stack([data[i] for i in torch.randperm(len(data))[:n].tolist()]))
    names, stats = (*SHAPES, "size", "cx", "cy", "red", "green", "blue"), []
    for o in (fake, real):  # one-hot domain and factors (n, 9), averaged over valid images
        x = torch.column_stack([F.one_hot(o["domain"].clamp(min=0), len(SHAPES)).float(),
                                o["size"], o["cx"], o["cy"], o["color"]])
        stats.append(x[o["valid"]].sum(0) / max(o["valid"].sum().item(), 1))  # (9,)
    diff = (stats[0] - stats[1]).abs()
    return {"valid_fake": fake["valid"].float().mean().item(),
            "valid_real": real["valid"].float().mean().item(),
            "share_mad": diff[:3].mean().item(), "factor_mean_mad": diff[3:].mean().item(),
            **{f"{k}_fake_real": v for k, *v in zip(names, *[s.tolist() for s in stats])}}


def read_styles(G, ws, noise=None):
    """The oracle's reading (toy.read_shapes) of g(ws) in chunks of 100; noise None: fresh."""
    return read_shapes(torch.cat([G.synthesis(w, noise).float().cpu() for w in ws.split(100)]))


def same(a, b, *factors, tol=0.05):
    """(n,) True where both images are valid and each factor matches: 'shape' exactly, 'pos' (cx,
    cy) within tol of the side on average, 'color' within 2·tol on average over RGB in [0, 1]."""
    ok = a["valid"] & b["valid"]
    for f in factors:
        ok &= (a["domain"] == b["domain"] if f == "shape" else
               ((a["cx"] - b["cx"]).abs() + (a["cy"] - b["cy"]).abs()) / 2 < tol if f == "pos"
               else (a["color"] - b["color"]).abs().mean(1) < 2 * tol)
    return ok


@torch.no_grad()
def mixing_scores(G, cfg, device, n=300):
    """Not in paper (toy): Fig. 3 read by the oracle. B's coarse styles in A should bring B's
    shape and position, B's fine styles B's colour. Share of n pairs where each holds (unreadable
    = does not); chance: the same match against an unrelated image (the next pair's B)."""
    z_a, z_b = torch.randn(2, n, cfg.w_dim, generator=torch.Generator().manual_seed(
        cfg.seed + 1)).to(device)
    noise, (coarse, _, fine) = G.synthesis.make_noise(1, device), style_bands(
        G.synthesis.num_layers)
    ws_a, ws_b = G.styles(z_a), G.styles(z_b)
    b = read_styles(G, ws_b, noise)
    b_other = {k: v.roll(1, 0) for k, v in b.items()}
    x_coarse = read_styles(G, with_band(ws_a, ws_b, coarse), noise)
    x_fine = read_styles(G, with_band(ws_a, ws_b, fine), noise)
    scores = {}
    for name, mixed, factor in (("coarse_shape", x_coarse, "shape"),
                                ("coarse_pos", x_coarse, "pos"), ("fine_color", x_fine, "color")):
        scores[f"mix_{name}"] = same(mixed, b, factor).float().mean().item()
        scores[f"mix_{name}_chance"] = same(mixed, b_other, factor).float().mean().item()
    return scores


@torch.no_grad()
def truncation_scores(G, cfg, device, n=300, psis=(1.0, 0.7, 0.5, 0.3, 0.0)):
    """Not in paper (toy): Fig. 8 read by the oracle. Colour std and shape diversity (1 − Σ
    share²) of the valid samples per ψ, and whether each falls as ψ goes 1 -> 0: never up by
    more than 0.02 (the sampling noise at n = 300), and at ψ = 0 at most half of it at ψ = 1."""
    z = torch.randn(n, cfg.w_dim, generator=torch.Generator().manual_seed(cfg.seed + 2))
    noise, scores = G.synthesis.make_noise(1, device), {}
    for psi in psis:  # one noise for all ψ: only w moves
        r = read_styles(G, G.styles(z.to(device), psi, cfg.trunc_cutoff), noise)
        v = r["valid"]
        share = torch.bincount(r["domain"][v], minlength=len(SHAPES)) / max(v.sum().item(), 1)
        scores[f"trunc_color_std_{psi}"] = r["color"][v].std(0).mean().item() if v.sum() > 1 else 0
        scores[f"trunc_shape_div_{psi}"] = 1 - share.pow(2).sum().item() if v.any() else 0.0
    for kind in ("color_std", "shape_div"):
        seq = [scores[f"trunc_{kind}_{psi}"] for psi in psis]
        scores[f"trunc_{kind}_falls"] = float(seq[-1] <= seq[0] / 2 and all(
            later <= before + 0.02 for before, later in zip(seq, seq[1:])))
    return scores


@torch.no_grad()
def noise_scores(G, cfg, device, n=40, draws=8):
    """Not in paper (toy): Fig. 4 read by the oracle. Images that differ only in noise keep shape
    and position (share of draws read as the first, over ws whose first read is valid) while
    their pixels still vary (noise_pixel_std: per-pixel std over the draws, mean, [-1, 1])."""
    z = torch.randn(n, cfg.w_dim, generator=torch.Generator().manual_seed(cfg.seed + 3))
    ws = G.styles(z.to(device))
    x = torch.stack([G.synthesis(ws).float().cpu() for _ in range(draws)])  # (draws, n, 3, R, R)
    r = [read_shapes(xd) for xd in x]
    kept = torch.stack([same(r[0], rd, "shape", "pos") for rd in r[1:]])  # (draws − 1, n)
    base = r[0]["valid"]
    return {"noise_shape_kept": kept[:, base].float().mean().item() if base.any() else 0.0,
            "noise_pixel_std": x.std(0).mean().item()}


def figure_scores(G, cfg, device):
    """What Figs. 3, 8 and 4 claim, as numbers (see the three functions above)."""
    return (mixing_scores(G, cfg, device) | truncation_scores(G, cfg, device)
            | noise_scores(G, cfg, device))


def oracle_lines(s):
    """The summary's oracle lines: what the samples and each figure show, in numbers."""
    psis, falls = (1.0, 0.7, 0.5, 0.3, 0.0), lambda k: "falls" if s[k] else "does NOT fall"
    seq = lambda kind: " ".join(f"{s[f'trunc_{kind}_{p}']:.2f}" for p in psis)  # noqa: E731
    mix = lambda k: f"{s[f'mix_{k}']:.2f} (chance {s[f'mix_{k}_chance']:.2f})"  # noqa: E731
    real_div = 1 - sum(s[f"{k}_fake_real"][1] ** 2 for k in SHAPES)  # as trunc_shape_div
    return [f"samples: {s['valid_fake']:.0%} read as a valid shape (real images "
            f"{s['valid_real']:.0%})",
            f"mixing: B's coarse styles bring B's shape {mix('coarse_shape')}, position "
            f"{mix('coarse_pos')}",
            f"        B's fine styles bring B's colour {mix('fine_color')}",
            f"truncation ψ 1 -> 0: colour std {seq('color_std')} "
            f"({falls('trunc_color_std_falls')})",
            f"                     shape diversity {seq('shape_div')} "
            f"({falls('trunc_shape_div_falls')}; real images {real_div:.2f})",
            f"noise only: shape and position kept {s['noise_shape_kept']:.2f}, pixel std "
            f"{s['noise_pixel_std']:.3f} ([-1, 1] units)"]

# ----------------------------------------------------------------------------
# 7. Train
# ----------------------------------------------------------------------------
def console_terms(cfg):
    """What the console line shows (log.jsonl has every term): L_D = logistic + γ/2·R1, its two
    parts, and L_G (the non-saturating loss, G's only term)."""
    return {"D": lambda v: v["D/adv"] + cfg.r1_gamma / 2 * v["D/r1"], "D_adv": "D/adv",
            "R1": "D/r1", "G": "G/adv"}


def train(cfg, device, given=()):
    (cfg, ckpt), out = prepare_run(cfg, given, FIXED), Path(cfg.out)  # resumed: see FIXED
    nets = build_nets(cfg, device)
    opts = build_optims(nets, cfg)
    (G, D, G_ema), (opt_G, opt_D), nets = vars(nets).values(), opts.values(), vars(nets)  # by name
    step = start = load_checkpoint(ckpt, nets, opts, map_location=device)["step"] if ckpt else 0
    check_same_weights(nets)  # torchrun: one run, every process from the same weights
    dataset = make_dataset(cfg)
    batches = real_batches(dataset, cfg, device, step)
    logger = Logger(out, cfg.total_iters, cfg.log_every, console_terms(cfg), start=step)
    last, losses, t0, stopped = out / "last.pt", {}, time.time(), False
    z_fixed = torch.randn(16, cfg.w_dim, generator=torch.Generator().manual_seed(cfg.seed))
    print(start_line(cfg, device, step, f"{len(dataset)} images below {dataset.folders[0]}"))

    def progress(step):  # rank 0: the sample grid, the loss curves; training RNG kept
        with own_rng(device):
            save_grid(G_ema(z_fixed.to(device)), out / f"sample_{step:06d}.png", 4)
            logger.plot(out / "losses.png")  # beside the samples, redrawn from log.jsonl

    try:
        # Before the first step, all the loop (and its end: the oracle) does later, once:
        # problems show in the first minute, and the first grid shows the untrained G.
        if is_main():
            progress(step)
            if cfg.data in ("", "toy"):
                with own_rng(device):
                    scores = oracle_scores(G_ema, cfg, device) | figure_scores(G_ema, cfg, device)
                print(f"oracle @ {step}: " + "\n    ".join(oracle_lines(scores)))
        check_save(last, step, cfg, nets, opts)
        saves = SaveTimer(cfg.save_every, cfg.save_minutes, cfg.total_iters, cfg.log_every)
        logger.t0 = time.time()  # its it/s and ETA: training steps only
        while step < cfg.total_iters:
            x_real = next_batch(batches)  # torchrun: a data error or Ctrl-C stops all here
            losses = d_step(G, D, opt_D, x_real, cfg)
            losses |= g_step(G, D, opt_G, cfg.batch, cfg, device)
            ema_update(G_ema, G, cfg)
            step += 1
            if step % cfg.log_every == 0:
                losses = mean_over_ranks(losses)  # torchrun: logged and checked on every process
                logger.log(step, losses)
                check_finite(losses, step, last)  # never train on for thousands of nan steps
            if (step % cfg.sample_every == 0 or step == cfg.total_iters) and is_main():
                progress(step)
            if saves.due(step):  # every save_every steps and every save_minutes
                save_checkpoint(last, step, cfg, nets, opts, losses=losses)
    except KeyboardInterrupt:  # keep the work done so far, if finite (else: one-line error)
        save_checkpoint(last, step, cfg, nets, opts, losses=losses, interrupted=True)
        stopped = True
    except Exception as e:  # a bug: last.pt is left as it was (never a half-done step)
        report_crash(e, step, last)
        raise
    if is_main():  # torchrun: rank 0 reports for the whole run
        with own_rng(device):  # the figures' noise: the same for the same weights
            finish(G_ema.eval(), cfg, device, out, (start, step, time.time() - t0), stopped)
    return nets


def finish(G_ema, cfg, device, out, run, stopped=False):
    """The end of a run: the paper's figures from G_ema and the toy oracle's reading of them
    (skipped after Ctrl-C: the user wants out), then the summary. run = (start, step, seconds)."""
    figs, line, toy, t0 = [], "", cfg.data in ("", "toy"), time.time()
    if not stopped:
        figs = figures(G_ema, cfg, out, device)
        if toy:
            scores = oracle_scores(G_ema, cfg, device) | figure_scores(G_ema, cfg, device)
            (out / "oracle.json").write_text(json.dumps(scores, indent=1))
            line = oracle_lines(scores)
    me, samples = Path(__file__).name, sorted(out.glob("sample_*.png"))[-1:]
    print_summary(me, run[1], run[0], run[2], [
        ("samples", samples), ("loss curves", [out / "losses.png"]), ("figures", figs),
        ("checkpoint", [out / "last.pt", out / "log.jsonl", out / "oracle.json"])], line, [
        (f"python {me} sample --out {out}", "the figures again"),
        (f"python {me} eval --out {out}", "PPL" + (" + the oracle" if toy else "")),
        (f"python {me} --out {out} --resume auto --total-iters {2 * cfg.total_iters}",
         "train on")], stopped, (time.time() - t0, "figures and oracle"))


def bench(cfg, device):
    """FLOPs of one training step, 2 warm-up steps, bench_iters timed steps on random images."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    nets = build_nets(cfg, device)
    (G, D, G_ema), (opt_G, opt_D) = vars(nets).values(), build_optims(nets, cfg).values()
    x = torch.rand(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device) * 2 - 1
    sync = lambda: torch.cuda.synchronize(device) if cuda else None  # noqa: E731
    with flop_counter() as counter:
        d_step(G, D, opt_D, x, cfg), g_step(G, D, opt_G, cfg.batch, cfg, device)
    for i in range(cfg.bench_iters + 2):
        if i == 2:
            sync()
            t0 = time.perf_counter()
        d_step(G, D, opt_D, x, cfg), g_step(G, D, opt_G, cfg.batch, cfg, device)
        ema_update(G_ema, G, cfg)
    sync()
    rate, N = cfg.bench_iters / (time.perf_counter() - t0), world_size()  # torchrun: global
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a"
    print(f"bench {cfg.img_size} px, batch {cfg.batch}{f' × {N} processes' if N > 1 else ''}, "
          f"{device.type}: {sig3(rate)} it/s | {sig3(rate * cfg.batch * N)} images/s | peak mem "
          f"{mem} | {sig3(counter.get_total_flops() * rate * N / 1e12)} TFLOP/s")


# ----------------------------------------------------------------------------
# 8. Entry point
# ----------------------------------------------------------------------------
def main(argv=None):
    extra = [(("--ckpt",), dict(default="", help="sample/eval: checkpoint (default out/last.pt)"))]
    cfg, ns = parse_config(Config, PRESETS, argv, __doc__, ("train", "sample", "eval"), extra)
    require(cfg.img_size in [2 ** k for k in range(3, 11)],
            f"--img-size {cfg.img_size}: must be a power of 2 from 8 to 1024")
    require(len(cfg.betas) == 2, f"--betas {' '.join(map(str, cfg.betas))}: Adam needs two values "
            "(β1 β2), e.g. --betas 0.0 0.99")
    check_flags(cfg, positive="batch lr mapping_lr_mul total_iters log_every sample_every "
                "save_every", nonneg="num_workers save_minutes", unit="betas")
    require(cfg.batch % min(4, cfg.batch) == 0, f"--batch {cfg.batch}: D's minibatch-stddev layer "
            "takes groups of 4; use a multiple of 4 (or 1, 2, 3)")
    seed_everything(cfg.seed)
    if cfg.bench or ns.mode == "train":  # under torchrun: this process's GPU (or the CPU)
        device = init_distributed(cfg.device)
        return bench(cfg, device) if cfg.bench else train(cfg, device, ns.given)
    device = pick_device(cfg.device)
    # sample / eval: G_ema of --ckpt (or, as before, --resume) PATH or out/last.pt (common.load_run)
    old = cfg.resume if cfg.resume not in ("", "auto") else ""
    G_ema = lambda c, _: {"G_ema": Generator(c).to(device).eval()}  # noqa: E731
    cfg, nets, _ = load_run(cfg, ns.ckpt or old, G_ema, ns.given, FIXED)
    G, out = nets["G_ema"], Path(cfg.out)
    if ns.mode == "sample":
        figures(G, cfg, out, device)
        return print(f"wrote {out}/truncation.png, style_mixing.png, stochastic_variation.png, "
                     "interpolation_z.gif, interpolation_w.gif")
    scores = {}
    try:  # pretrained LPIPS-VGG16; offline, PPL is skipped with the one-line fix
        lpips = LPIPS("vgg").to(device)
        scores = {f"ppl_{s}_full": ppl(G, lpips, s, cfg, device) for s in ("z", "w")}
    except UserError as e:
        print(f"PPL skipped: {e}")
    if cfg.data in ("", "toy"):
        scores |= oracle_scores(G, cfg, device) | figure_scores(G, cfg, device)
    (out / "eval.json").write_text(json.dumps(scores, indent=1))
    print(json.dumps(scores))
    return scores


if __name__ == "__main__":
    main_guard(main)

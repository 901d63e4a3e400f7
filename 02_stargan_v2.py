"""StarGAN v2: Diverse Image Synthesis for Multiple Domains. Choi, Uh, Yoo, Ha. CVPR 2020,
arXiv:1912.01865v2. Read §2 (networks, Eqs. (1)-(5)), App. A/B (architecture, training details).
Symbols: G generator, F -> `mapping`, E style encoder, D multi-task discriminator; x image,
y domain, z latent, s style, λ_sty/_ds/_cyc/_reg -> lambda_*, ψ -> psi (truncation toward s_avg).
Shapes: B batch, K domains, S style_dim, Z latent_dim, C channels, H = W = img_size.

Run:     python 02_stargan_v2.py               # toy scenes 16×16, 2800 steps, CPU; oracle scores
         python 02_stargan_v2.py --data data/afhq        # preset afhq (3 domains, λ_ds 2, w_hpf 0)
         python 02_stargan_v2.py --data data/celeba_hq   # preset celeba_hq (λ_ds 1, w_hpf 1)
Smoke:   python 02_stargan_v2.py --total-iters 20 --out runs/smoke  (and --resume auto: goes on)
GPUs:    torchrun --nproc_per_node 8 02_stargan_v2.py --data data/afhq --batch 1  # batch per GPU
Bench:   python 02_stargan_v2.py --bench [--preset afhq]   # one line: it/s, img/s, memory, TFLOP/s
Sample:  python 02_stargan_v2.py sample --ckpt runs/stargan_v2_toy/last.pt --src a.png --ref refs/
         --domain 1   |  ... sample --preset afhq --official-ckpt 100000_nets_ema.ckpt --src ...
Eval:    python 02_stargan_v2.py eval --ckpt runs/stargan_v2_toy/last.pt [--random-weights]
Align:   python 02_stargan_v2.py align --src my_faces/ --out aligned/   # faces like CelebA-HQ
Builds on: 01's one G for many domains (here y picks a branch of F and E and an output of D); 03's
latent cycle, on styles (s → G → E(x_fake) ≈ s) with diversity from z; 04's mapping network, AdaIN.
Expected: default toy run (2800 steps, 16 px): the sky (domain) is reached in 100 % of translations
(latent and reference); the object keeps the source's position in 96-100 % and its shape in 76-82 %
(chance 35 %); its colour follows the reference (error 0.07-0.09; seeds 0-3, 1 or 2 threads).
Official quirks (clovaai/stargan-v2 core/solver.py, core/model.py) and what we do:
- Deviation: EMA copies start as copies of the He-initialised nets (official: default init, as it
  deep-copies before init): irrelevant after 100k steps, but it would spoil short runs.
- Deviation: λ_ds decay is a pure function of the step: it survives resume (official restarts it).
- Copied: with w_hpf > 0 the AdaIN block drops its shortcut (conv1x1 exists, gets no gradient);
  the ds loss detaches the 2nd image; the reference G step updates G only.
- Copied: w_hpf > 0 (CelebA-HQ) takes face masks from the frozen, pretrained FAN (data/fan.py,
  `python data/download.py wing`): FAN(x_real) for the D and G steps, FAN(x_fake) for the cycle.
"""
import copy
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from torchvision.utils import make_grid


from common import (Logger, SaveTimer, UserError, autocast, average_gradients, check_finite,
                    check_flags, check_same_weights, check_save, flop_counter, init_distributed,
                    is_main, load_checkpoint, load_run, main_guard, mean_over_ranks, next_batch,
                    own_rng, parse_config, pick_device, prepare_run, print_summary, report_crash,
                    require, save_checkpoint, save_gif, save_grid, seed_everything, shard_draw,
                    short_path, sig3, start_line, strip_prefixes, world_size)
from data.datasets import (DomainFolder, ImageFiles, ReferencePairs, load_rgb, load_rgb_files,
                           resolve_data, step_loader, to_tensor_norm)
from data.fan import FAN, align_faces, load_fan, read_npz
from data.metrics import InceptionPool, LPIPS, frechet_distance
from data.toy import read_scenes

# ----------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------
@dataclass
class Config:
    data: str = ""                   # {train,val}/<domain>/*.png root; "" or "toy": toy scenes
    out: str = "runs/stargan_v2"     # run folder: last.pt, samples/, log.jsonl
    resume: str = ""                 # "" fresh, "auto" (out/last.pt if present) or a checkpoint
    overwrite: bool = False          # start fresh even if out/last.pt exists
    device: str = "auto"             # auto | cpu | cuda
    seed: int = 777                  # official seed
    amp: bool | None = None          # bf16 autocast: default CUDA only; --amp on the CPU too
    channels_last: bool = False      # NHWC tensors and weights (CUDA speed-up)
    bench: bool = False              # time training iterations on random data instead of training
    compile: bool = False            # torch.compile G, F, E (D eager: R1's double backward)
    bench_iters: int = 20            # timed iterations for --bench
    img_size: int = 256              # image side H = W (official 256)
    num_domains: int = 3             # K; must equal the number of domain folders
    latent_dim: int = 16             # Z, dimension of z (§2)
    style_dim: int = 64              # S, dimension of s (§2)
    dim_in: int = 0                  # first conv width of G, E, D; 0 -> official 2**14 // img_size
    max_conv_dim: int = 512          # channel cap of G, E, D (official 512)
    mapping_dim: int = 512           # hidden width of F (official hard-codes 512)
    w_hpf: float = 0.0               # high-pass skip weight: 1 for CelebA-HQ, 0 for AFHQ (App. A)
    wing: str = "data/checkpoints/wing/wing.ckpt"  # FAN weights: face masks when w_hpf > 0
    lambda_reg: float = 1.0          # λ_reg, weight of R1 on real images (App. B, γ = 1)
    lambda_sty: float = 1.0          # λ_sty, style reconstruction, Eq. (5)
    lambda_ds: float = 1.0           # λ_ds at step 0, diversity sensitive (subtracted), Eq. (5)
    lambda_cyc: float = 1.0          # λ_cyc, cycle consistency, Eq. (5)
    ds_iter: int = 100000            # λ_ds decays linearly to 0 over this many iterations (App. B)
    lr: float = 1e-4                 # Adam lr of G, E, D
    f_lr: float = 1e-6               # Adam lr of F (mapping), 100x smaller
    beta1: float = 0.0               # Adam β1
    beta2: float = 0.99              # Adam β2
    weight_decay: float = 1e-4       # Adam's coupled L2 (not AdamW), as official
    ema_beta: float = 0.999          # EMA decay of G, F, E
    batch: int = 8                   # batch per process; global batch = N processes × batch
    total_iters: int = 100000        # training iterations
    randcrop_prob: float = 0.5       # p of RandomResizedCrop(scale 0.8-1, ratio 0.9-1.1)
    num_workers: int = 4             # data loader workers
    log_every: int = 10              # print/log losses every N steps
    sample_every: int = 5000         # write sample grids from the EMA nets every N steps
    save_every: int = 10000          # write out/last.pt every N steps
    save_minutes: float = 30.0       # and every N minutes of wall time (0: by steps only)


PRESETS = {
    "afhq": dict(num_domains=3, lambda_ds=2.0, w_hpf=0.0, out="runs/stargan_v2_afhq"),
    "celeba_hq": dict(num_domains=2, lambda_ds=1.0, w_hpf=1.0, out="runs/stargan_v2_celeba_hq"),
    # Not in paper: 16×16 toy scenes, widths 32-64, lr 1e-3, EMA 0.99, 2800 steps, so that a CPU
    # run of minutes learns the toy domains and keeps the source's shape; everything else
    # official. At 16 px the official G has no down/up-sampling blocks (repeat_num = log2(16) -
    # 4 = 0): every layer sees the full 16×16 grid, which keeps the object's place; at 32 px,
    # widths 16-64, it learnt even the identity slower. The lr: this G learns the identity slowly
    # (L1 autoencoder, 600 steps: shape kept 49 % at 3e-4, 77 % at 1e-3); at 3e-4 1500 GAN steps
    # left every output a round blob (shape kept 30 %, chance 35 %).
    # F's lr stays 100× below the others' (official 1e-6 vs 1e-4) and λ_ds is AFHQ's 2 (3 domains):
    # colour error vs the reference, seeds 0 / 1 / 2 / 3, was 0.09 / 0.22 / - / - with f_lr 1e-6
    # and λ_ds 1 (F barely trained; seed 1 kept half the source's colour), 0.08 / 0.08 / 0.07 /
    # 0.21 with f_lr 1e-5, and is 0.07 / 0.08 / 0.08 / 0.08 with both (1 thread).
    # Deviation: λ_ds reaches 0 half-way (ds_iter = total_iters / 2; paper: at the last step), so
    # the second half refines without the diversity term; decayed over all 3000 steps, the source's
    # colour still leaked into the output (colour error vs the reference 0.17, half-way 0.09;
    # both with f_lr 1e-6 and λ_ds 1, before the change above).
    "toy": dict(img_size=16, dim_in=32, max_conv_dim=64, mapping_dim=64, num_domains=3, lr=1e-3,
                f_lr=1e-5, lambda_ds=2.0, total_iters=2800, ds_iter=1400, ema_beta=0.99, batch=8,
                randcrop_prob=0.0, num_workers=0, log_every=50, sample_every=1000,
                save_every=1000, out="runs/stargan_v2_toy"),
}
# Resume, sample and eval refuse a change of these (the weights would not fit, or mean something
# else); any other given flag is applied (common.run_config).
FIXED = ("data", "img_size", "num_domains", "latent_dim", "style_dim", "dim_in", "max_conv_dim",
         "mapping_dim", "w_hpf")
NET_NAMES = ("G", "mapping", "E", "D")
OFFICIAL_NAMES = {"G": "generator", "mapping": "mapping_network", "E": "style_encoder",
                  "D": "discriminator"}


# ----------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------
class ResBlk(nn.Module):
    """Pre-activation residual block (E, D, G's encoder); the sum / √2 keeps unit variance."""
    def __init__(self, dim_in, dim_out, normalize=False, downsample=False):
        super().__init__()
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()  # no state: layout unchanged
        self.conv1 = nn.Conv2d(dim_in, dim_in, 3, 1, 1)  # official order: conv1, conv2, norms, 1×1
        self.conv2 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        norm = (lambda: nn.InstanceNorm2d(dim_in, affine=True)) if normalize else nn.Identity
        self.norm1, self.norm2 = norm(), norm()
        self.conv1x1 = (nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out
                        else nn.Identity())  # a learned shortcut only where the width changes

    def forward(self, x):
        """x (B, Cin, H, W) -> (B, Cout, H', W'), H' = H/2 if downsample."""
        sc = self.pool(self.conv1x1(x))  # (B, Cout, H', W')
        h = self.pool(self.conv1(F.leaky_relu(self.norm1(x), 0.2)))  # (B, Cin, H', W')
        h = self.conv2(F.leaky_relu(self.norm2(h), 0.2))  # (B, Cout, H', W')
        return (sc + h) / math.sqrt(2)


class AdaIN(nn.Module):
    """(1 + γ(s)) · IN(x) + β(s): '1 +': a zero-initialised bias starts at identity scale."""
    def __init__(self, style_dim, num_features):
        super().__init__()
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        self.fc = nn.Linear(style_dim, num_features * 2)

    def forward(self, x, s):
        """x (B, C, H, W), s (B, S) -> (B, C, H, W)."""
        gamma, beta = self.fc(s)[:, :, None, None].chunk(2, dim=1)  # 2 × (B, C, 1, 1)
        return (1 + gamma) * self.norm(x) + beta


class AdainResBlk(nn.Module):
    """Decoder block of G: the style s enters through two AdaINs."""
    def __init__(self, dim_in, dim_out, style_dim=64, w_hpf=0.0, upsample=False):
        super().__init__()
        self.w_hpf, self.upsample = w_hpf, upsample
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, 1, 1)
        self.norm1, self.norm2 = AdaIN(style_dim, dim_in), AdaIN(style_dim, dim_out)
        self.conv1x1 = (nn.Conv2d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out
                        else nn.Identity())

    def forward(self, x, s):
        """x (B, Cin, H, W), s (B, S) -> (B, Cout, H', W'), H' = 2H if upsample."""
        h = F.leaky_relu(self.norm1(x, s), 0.2)
        h = F.interpolate(h, scale_factor=2, mode="nearest") if self.upsample else h  # H'
        h = self.conv2(F.leaky_relu(self.norm2(self.conv1(h), s), 0.2))  # (B, Cout, H', W')
        if self.w_hpf > 0:  # official quirk: the shortcut is dropped (its conv1x1 stays unused)
            return h
        sc = F.interpolate(x, scale_factor=2, mode="nearest") if self.upsample else x
        return (self.conv1x1(sc) + h) / math.sqrt(2)


class HighPass(nn.Module):
    """Depthwise 3×3 Laplacian / w_hpf: passes edges of masked encoder features to the decoder."""
    def __init__(self, w_hpf):
        super().__init__()
        kernel = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]]) / w_hpf
        self.register_buffer("filter", kernel)

    def forward(self, x):
        return F.conv2d(x, self.filter.expand(x.shape[1], 1, 3, 3), padding=1, groups=x.shape[1])


class Generator(nn.Module):
    """G(x, s): encoder (ResBlk + IN, downsampling) -> bottleneck -> AdaIN decoder -> to_rgb."""
    def __init__(self, img_size=256, style_dim=64, max_conv_dim=512, w_hpf=0.0, dim_in=0):
        super().__init__()
        dim = dim_in or 2**14 // img_size
        self.from_rgb = nn.Conv2d(3, dim, 3, 1, 1)
        self.encode, self.decode = nn.ModuleList(), nn.ModuleList()
        self.to_rgb = nn.Sequential(nn.InstanceNorm2d(dim, affine=True), nn.LeakyReLU(0.2),
                                    nn.Conv2d(dim, 3, 1, 1, 0))  # linear output, no tanh
        for _ in range(int(math.log2(img_size)) - 4 + int(w_hpf > 0)):  # repeat_num down/up pairs
            dim_out = min(dim * 2, max_conv_dim)
            self.encode.append(ResBlk(dim, dim_out, normalize=True, downsample=True))
            self.decode.insert(0, AdainResBlk(dim_out, dim, style_dim, w_hpf, upsample=True))
            dim = dim_out
        for _ in range(2):  # bottleneck
            self.encode.append(ResBlk(dim, dim, normalize=True))
            self.decode.insert(0, AdainResBlk(dim, dim, style_dim, w_hpf))
        if w_hpf > 0:
            self.hpf = HighPass(w_hpf)

    def forward(self, x, s, masks=None):
        """x (B, 3, H, W) in [-1, 1], s (B, S), masks: None | 2 heatmaps (B, 1, H, W) -> x_fake."""
        cache, x = {}, self.from_rgb(x)  # (B, dim_in, H, W)
        for block in self.encode:  # H -> H/2^repeat_num
            cache[x.shape[2]] = x  # encoder features per resolution, for the high-pass skips
            x = block(x)
        for block in self.decode:  # back to H
            x = block(x, s)
            if masks is not None and x.shape[2] in (32, 64, 128):
                mask = masks[0] if x.shape[2] == 32 else masks[1]  # full face | eyes/nose only
                mask = F.interpolate(mask, size=x.shape[2:], mode="bilinear")
                x = x + self.hpf(mask * cache[x.shape[2]])
        return self.to_rgb(x)  # (B, 3, H, W), unbounded (no tanh, as official)


class MappingNetwork(nn.Module):
    """F(z, y): shared MLP, then one output branch per domain; the branch of y gives s."""
    def __init__(self, latent_dim=16, style_dim=64, num_domains=2, hidden=512):
        super().__init__()
        fc = lambda n_in: [nn.Linear(n_in, hidden), nn.ReLU()]  # noqa: E731
        self.shared = nn.Sequential(*fc(latent_dim), *fc(hidden), *fc(hidden), *fc(hidden))
        self.unshared = nn.ModuleList(
            nn.Sequential(*fc(hidden), *fc(hidden), *fc(hidden), nn.Linear(hidden, style_dim))
            for _ in range(num_domains))

    def forward(self, z, y):
        """z (B, Z), y (B,) long -> s (B, S)."""
        h = self.shared(z)  # (B, hidden)
        out = torch.stack([branch(h) for branch in self.unshared], dim=1)  # (B, K, S)
        return out[torch.arange(len(y), device=y.device), y]  # (B, S)


def _trunk(img_size, dim_in, max_conv_dim):
    """Shared layout of E and D, and its width: conv, ResBlks down to 4×4, 4×4 conv to 1×1."""
    dim = dim_in or 2**14 // img_size
    layers = [nn.Conv2d(3, dim, 3, 1, 1)]
    for _ in range(int(math.log2(img_size)) - 2):  # H -> 4
        dim_out = min(dim * 2, max_conv_dim)
        layers.append(ResBlk(dim, dim_out, downsample=True))
        dim = dim_out
    layers += [nn.LeakyReLU(0.2), nn.Conv2d(dim, dim, 4, 1, 0), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers), dim


class StyleEncoder(nn.Module):
    """E(x, y): style code of image x in domain y (one linear head per domain)."""
    def __init__(self, img_size=256, style_dim=64, num_domains=2, max_conv_dim=512, dim_in=0):
        super().__init__()
        self.shared, dim = _trunk(img_size, dim_in, max_conv_dim)
        self.unshared = nn.ModuleList(nn.Linear(dim, style_dim) for _ in range(num_domains))

    def forward(self, x, y):
        """x (B, 3, H, W), y (B,) -> s (B, S)."""
        h = self.shared(x).flatten(1)  # (B, C)
        out = torch.stack([head(h) for head in self.unshared], dim=1)  # (B, K, S)
        return out[torch.arange(len(y), device=y.device), y]  # (B, S)


class Discriminator(nn.Module):
    """D(x, y): one real/fake logit per domain (multi-task D, §2); y picks the output."""
    def __init__(self, img_size=256, num_domains=2, max_conv_dim=512, dim_in=0):
        super().__init__()
        trunk, dim = _trunk(img_size, dim_in, max_conv_dim)
        self.main = nn.Sequential(*trunk, nn.Conv2d(dim, num_domains, 1, 1, 0))

    def forward(self, x, y):
        """x (B, 3, H, W), y (B,) -> logits (B,)."""
        out = self.main(x).flatten(1)  # (B, K)
        return out[torch.arange(len(y), device=y.device), y]  # (B,)


def he_init(module):
    """Kaiming-normal (fan_in, ReLU gain) on every conv/linear weight, biases 0 (official)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def masks_of(fan, x):
    """FAN face masks of x for G's high-pass skips, or None when G has none (w_hpf = 0)."""
    return fan.masks(x) if fan is not None else None


# ----------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------
def adv_loss(logits, target):
    """Eq. (1): non-saturating BCE with logits: softplus(-l) for target 1, softplus(l) for 0."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))


def r1_reg(d_out, x_real):
    """R1 (App. B, Mescheder et al. 2018): 0.5 · E ||∇_x D(x)||² on real images only. Under bf16
    autocast: bf16 keeps fp32's exponent range, so small gradients do not underflow (fp16 would
    need loss scaling); the sum, square and mean run in fp32 so no term is lost to rounding."""
    grad, = torch.autograd.grad(d_out.float().sum(), x_real, create_graph=True)
    return 0.5 * grad.float().pow(2).flatten(1).sum(1).mean()


def style_rec_loss(s_pred, s_trg):
    """Eq. (2): E ||s̃ - E_ỹ(G(x, s̃))||_1 (reduced in fp32, also under bf16 autocast)."""
    return (s_pred.float() - s_trg.float()).abs().mean()


def ds_loss(x_fake, x_fake2):
    """Eq. (3): E ||G(x, s̃1) - G(x, s̃2)||_1, maximised; the 2nd image is detached (official)."""
    return (x_fake.float() - x_fake2.detach().float()).abs().mean()


def cycle_loss(x_rec, x_real):
    """Eq. (4): E ||x - G(G(x, s̃), ŝ)||_1 with ŝ = E_y(x)."""
    return (x_rec.float() - x_real.float()).abs().mean()


def g_total(loss_adv, loss_sty, loss_ds, loss_cyc, cfg, lambda_ds):
    """Eq. (5): L_G = L_adv + λ_sty L_sty - λ_ds L_ds + λ_cyc L_cyc (L_ds is maximised)."""
    return loss_adv + cfg.lambda_sty * loss_sty - lambda_ds * loss_ds + cfg.lambda_cyc * loss_cyc


def lambda_ds_at(step, cfg):
    """λ_ds decays linearly from cfg.lambda_ds at step 0 to 0 at ds_iter (pure: resume-exact)."""
    return cfg.lambda_ds * max(0.0, 1.0 - step / cfg.ds_iter)


def d_loss(nets, cfg, x_real, y_org, y_trg, z_trg=None, x_ref=None, masks=None):
    """L_D = L_real + L_fake + λ_reg R1; the fake's style comes from F(z) or E(x_ref)."""
    x_real = x_real.detach().requires_grad_()  # R1 needs ∂D/∂x
    out = nets.D(x_real, y_org)  # (B,)
    loss_real, loss_reg = adv_loss(out, 1), r1_reg(out, x_real)
    with torch.no_grad():
        s_trg = nets.mapping(z_trg, y_trg) if z_trg is not None else nets.E(x_ref, y_trg)
        x_fake = nets.G(x_real, s_trg, masks)  # (B, 3, H, W)
    loss_fake = adv_loss(nets.D(x_fake, y_trg), 0)
    loss = loss_real + loss_fake + cfg.lambda_reg * loss_reg
    return loss, dict(real=loss_real, fake=loss_fake, reg=loss_reg)


def g_loss(nets, cfg, lambda_ds, x_real, y_org, y_trg, z_trgs=None, x_refs=None, masks=None,
           fan=None):
    """Eq. (5) for one batch; styles from (z, z2) through F or from (x_ref, x_ref2) through E.
    masks: FAN(x_real) for G(x_real, ·); the cycle's G(x_fake, ·) gets FAN(x_fake) (official)."""
    s_trg, s_trg2 = ([nets.mapping(z, y_trg) for z in z_trgs] if z_trgs is not None
                     else [nets.E(x, y_trg) for x in x_refs])  # 2 × (B, S)
    x_fake = nets.G(x_real, s_trg, masks)  # (B, 3, H, W)
    loss_adv = adv_loss(nets.D(x_fake, y_trg), 1)
    loss_sty = style_rec_loss(nets.E(x_fake, y_trg), s_trg)
    with torch.no_grad():  # detached anyway (official): building its graph would be wasted work
        x_fake2 = nets.G(x_real, s_trg2, masks)
    loss_ds = ds_loss(x_fake, x_fake2)
    s_org = nets.E(x_real, y_org)  # ŝ, style of the source in its own domain
    loss_cyc = cycle_loss(nets.G(x_fake, s_org, masks_of(fan, x_fake)), x_real)  # no_grad masks
    loss = g_total(loss_adv, loss_sty, loss_ds, loss_cyc, cfg, lambda_ds)
    return loss, dict(adv=loss_adv, sty=loss_sty, ds=loss_ds, cyc=loss_cyc)


# ----------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------
def domain_sets(cfg):
    """Train-split readers of sources and of reference pairs, with the official transform."""
    crop = T.RandomResizedCrop(cfg.img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1))
    tf = T.Compose([T.RandomApply([crop], p=cfg.randcrop_prob), T.Resize([cfg.img_size] * 2),
                    T.RandomHorizontalFlip(), to_tensor_norm()])
    root = resolve_data(cfg.data, "scenes", cfg.img_size)
    src = DomainFolder(root, "train", tf)
    n = len(src.domains)
    require(n == cfg.num_domains, f"--data {root}: {n} domain folders {src.domains} but "
            f"--num-domains {cfg.num_domains}; pass --num-domains {n}")
    return root, src, ReferencePairs(root, "train", tf, skipped=src.skipped)  # named once


def stack_split(root, split, img_size, per_domain=None):
    """All images of a split (or the first per_domain of each domain) as tensors (N, 3, H, W)."""
    data = DomainFolder(root, split, T.Compose([T.Resize([img_size] * 2), to_tensor_norm()]))
    y = torch.tensor(data.targets)
    idx = [i for i in range(len(y)) if per_domain is None or (y[:i] == y[i]).sum() < per_domain]
    return torch.stack([data[i][0] for i in idx]), y[idx]  # (N, 3, H, W), (N,)


# ----------------------------------------------------------------------------
# 5. Steps
# ----------------------------------------------------------------------------
def build_nets(cfg, device="cpu"):
    """Nets G, mapping, E, D (He init) and EMA copies of G, F, E (Deviation: copied after init)."""
    c, fmt = cfg, torch.channels_last if cfg.channels_last else torch.contiguous_format
    nets = SimpleNamespace(**{k: he_init(net).to(device, memory_format=fmt) for k, net in dict(
        G=Generator(c.img_size, c.style_dim, c.max_conv_dim, c.w_hpf, c.dim_in),
        mapping=MappingNetwork(c.latent_dim, c.style_dim, c.num_domains, c.mapping_dim),
        E=StyleEncoder(c.img_size, c.style_dim, c.num_domains, c.max_conv_dim, c.dim_in),
        D=Discriminator(c.img_size, c.num_domains, c.max_conv_dim, c.dim_in)).items()})
    ema = SimpleNamespace(**{k: copy.deepcopy(getattr(nets, k)).requires_grad_(False)
                             for k in ("G", "mapping", "E")})
    for net in (nets.G, nets.mapping, nets.E) if cfg.compile else ():
        net.compile()  # in place: state_dict names unchanged; the EMA copies stay eager
    return nets, ema


def face_net(cfg, device, random_ok=False):
    """The frozen FAN whose face masks G's high-pass skips use when w_hpf > 0; None otherwise."""
    if cfg.w_hpf <= 0:
        return None
    if random_ok and not Path(cfg.wing).is_file():  # --bench: the time, not the masks, counts
        return FAN().to(device)
    require(Path(cfg.wing).is_file(), f"--w-hpf {cfg.w_hpf}: the high-pass skips need face masks "
            f"from the FAN weights, not found at {cfg.wing}; run `python data/download.py wing` "
            "(or pass --wing PATH), or leave the skips out with --w-hpf 0")
    return load_fan(cfg.wing, device)


def apply_grads(loss, terms, optims, names):
    """Backprop into the parameters of `names` only, step their optimizers; detached terms."""
    for o in optims.values():
        o.zero_grad(set_to_none=True)
    loss.backward(inputs=[p for n in names for g in optims[n].param_groups for p in g["params"]])
    average_gradients(*(optims[n] for n in names))  # torchrun: the global batch's gradient
    for n in names:
        optims[n].step()
    return {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def ema_update(ema, nets, beta):
    """θ_ema <- β θ_ema + (1 - β) θ for G, F, E (parameters; they hold no buffers to sync)."""
    for k, avg in vars(ema).items():  # G, mapping, E
        torch._foreach_lerp_(list(avg.parameters()), list(getattr(nets, k).parameters()), 1 - beta)


def d_step(nets, optims, cfg, x_real, y_org, y_trg, z_trg=None, x_ref=None, masks=None):
    """One D update with a latent (z_trg) or reference (x_ref) style; changes D only."""
    with autocast(x_real.device, cfg.amp):
        loss, terms = d_loss(nets, cfg, x_real, y_org, y_trg, z_trg, x_ref, masks)
    return apply_grads(loss, terms, optims, ["D"])


def g_step(nets, optims, cfg, lambda_ds, x_real, y_org, y_trg, z_trgs=None, x_refs=None,
           masks=None, fan=None):
    """Latent styles update G, F and E; reference styles update G only (official: E's gradient
    from the reference step is computed there but never applied; we do not compute it)."""
    with autocast(x_real.device, cfg.amp):
        loss, terms = g_loss(nets, cfg, lambda_ds, x_real, y_org, y_trg, z_trgs, x_refs, masks,
                             fan)
    return apply_grads(loss, terms, optims, ["G", "mapping", "E"] if z_trgs is not None else ["G"])


def train_step(nets, ema, optims, batch, step, cfg, fan=None):
    """One official iteration (core/solver.py, Solver.train). Returns detached loss tensors (no
    host sync). fan: the frozen FAN when w_hpf > 0; its masks of x_real serve all four steps
    (official)."""
    x_real, y_org, x_ref, x_ref2, y_trg = batch  # y_trg: reference domain, also for latent steps
    masks = masks_of(fan, x_real)  # None, or 2 × (B, 1, 256, 256)
    # z_trg, z_trg2 (2, B, Z): under torchrun this process's rows of the global batch's draw
    z_trgs = shard_draw(lambda n: torch.randn(2, n, cfg.latent_dim, device=x_real.device),
                        x_real.shape[0], dim=1)
    lambda_ds = lambda_ds_at(step, cfg)
    logs = {"G/lambda_ds": torch.tensor(lambda_ds)}
    # 1. D step, latent style  2. D step, reference style
    for mode, kw in (("latent", dict(z_trg=z_trgs[0])), ("ref", dict(x_ref=x_ref))):
        terms = d_step(nets, optims, cfg, x_real, y_org, y_trg, **kw, masks=masks)
        logs.update({f"D/{mode}_{k}": v for k, v in terms.items()})
    # 3. G step, latent styles (G, F, E)  4. G step, reference styles (G only)
    for mode, kw in (("latent", dict(z_trgs=z_trgs)), ("ref", dict(x_refs=(x_ref, x_ref2)))):
        terms = g_step(nets, optims, cfg, lambda_ds, x_real, y_org, y_trg, **kw, masks=masks,
                       fan=fan)
        logs.update({f"G/{mode}_{k}": v for k, v in terms.items()})
    ema_update(ema, nets, cfg.ema_beta)  # 5. EMA of G, F, E
    return logs


def build_optims(nets, cfg):
    """Adam β = (0, 0.99), coupled weight decay; F at lr 1e-6 (official)."""
    fast = dict(fused=True) if next(nets.G.parameters()).is_cuda else dict(foreach=True)
    return {n: torch.optim.Adam(getattr(nets, n).parameters(), lr=cfg.f_lr if n == "mapping" else
                                cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                **fast) for n in NET_NAMES}


# ----------------------------------------------------------------------------
# 6. Sampling
# ----------------------------------------------------------------------------
def load_official(path, nets):
    """Official {'generator': sd, ...} into {"G": net, ...}, entry by entry by name and shape. Both
    release generations load: 2020 files have no 'hpf.filter' (a constant, kept from ours; it became
    a buffer in 2021), `module.` prefixes (nn.DataParallel) are dropped, and *_nets_ema.ckpt files
    have no discriminator (D is then left as it is)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated, not a torch file
        raise UserError(f"--official-ckpt {path}: cannot read ({e.__class__.__name__}); "
                        "pass a *_nets_ema.ckpt from the StarGAN v2 release") from None
    require(isinstance(ckpt, dict) and "generator" in ckpt, f"--official-ckpt {path}: not a "
            "StarGAN v2 release file (no 'generator' entry); pass a *_nets_ema.ckpt")
    fix = "pass the matching --preset (afhq / celeba_hq) and --img-size"
    for ours, net in nets.items():
        theirs = OFFICIAL_NAMES[ours]
        if theirs not in ckpt and ours == "D":
            continue
        require(theirs in ckpt, f"--official-ckpt {path}: no '{theirs}' entry (has {list(ckpt)})")
        src, dst = strip_prefixes(ckpt[theirs]), net.state_dict()
        if "hpf.filter" in dst and "hpf.filter" not in src:  # a 2020 release file
            src["hpf.filter"] = dst["hpf.filter"]
        missing, extra = [k for k in dst if k not in src], [k for k in src if k not in dst]
        diff = "; ".join(t for t in (missing and f"lacks {missing[:3]}",
                                     extra and f"has unexpected {extra[:3]}") if t)
        require(not diff, f"--official-ckpt {path}: {theirs} {diff}; {fix}")
        for key, value in src.items():
            require(value.shape == dst[key].shape, f"--official-ckpt {path}: {theirs}.{key} is "
                    f"{tuple(value.shape)}, ours {tuple(dst[key].shape)}; {fix}")
        net.load_state_dict(src)


@torch.no_grad()
def translate_all(G, x_src, styles, fan=None, chunk=64):
    """G(x_src, styles) in chunks (memory), clamped: x_src (N, 3, H, W), styles (N, S)."""
    return torch.cat([G(x, s, masks_of(fan, x)).clamp(-1, 1)
                      for x, s in zip(x_src.split(chunk), styles.split(chunk))])


def fixed_batch(x, y, names):
    """The sample grids' fixed inputs, a val split of any size: per domain up to 2 sources, then up
    to 2 other images as references; a domain of 1 image gives it as both (and says so once)."""
    src, ref = [], []
    for k, name in enumerate(names):
        idx = (y == k).nonzero()[:, 0].tolist()
        n = min(2, (len(idx) + 1) // 2)  # 3 images: 2 sources, 1 reference
        src, ref = src + idx[:n], ref + (idx[n:n + 2] or idx[:1])
        if len(idx) == 1:
            print(f"samples: val/{name} holds 1 image; it is both a source and a reference in "
                  "the sample grids (add images to see them apart)")
    return x[src], y[src], x[ref], y[ref]  # (N, 3, H, W), (N,), (R, 3, H, W), (R,)


def cycle_refs(y_src, y_ref, K):
    """For each source, a reference of the next domain that has one (cycling through its
    references): the cycle strip then shows translations, as official's random references do.
    y_src, y_ref: lists of domain indices (host-side: no GPU sync) -> a list of reference rows."""
    pick = []
    for i, k in enumerate(y_src):
        for step in range(1, K + 1):  # the next domain, or the one after...
            refs = [j for j, d in enumerate(y_ref) if d == (k + step) % K]
            if refs:
                pick.append(refs[y_src[:i].count(k) % len(refs)])
                break
    return pick


def ref_rows(G, x_src, x_ref, s_ref, masks=None):
    """Reference grid rows: a white cell + the sources, then per reference: it + translations."""
    rows = [torch.ones_like(x_src[:1]), x_src]
    for x, s in zip(x_ref, s_ref):
        rows += [x[None], G(x_src, s.expand(len(x_src), -1), masks)]
    return torch.cat(rows)  # ((R + 1) (N + 1), 3, H, W)


def save_masks(x_src, masks, path):
    """Rows: the sources, then the masks G uses at 32 px (whole face) and at 64/128 px."""
    grey = [F.interpolate(m, size=x_src.shape[2:], mode="bilinear").expand_as(x_src) * 2 - 1
            for m in masks]  # (N, 3, H, W) each, in [-1, 1] like the images
    save_grid(torch.cat([x_src, *grey]), path, nrow=len(x_src),
              rows=["source", "mask 32 px", "mask 64+ px"])


@torch.no_grad()
def write_samples(ema, fixed, out, tag, cfg, fan=None, n_z=5, names=(), labels=None):
    """EMA nets on a fixed batch (fixed_batch): cycle strip, latent grids (ψ 0.5, 0.7, 1),
    reference grid, and with w_hpf > 0 the FAN's face masks of the sources. Rows are labelled
    with the domain names (default: their indices). labels: y_src and y_ref as lists, read once
    by the caller (default: read here, a GPU sync)."""
    x_src, y_src, x_ref, y_ref = fixed
    G, mapping, E, N, K = ema.G, ema.mapping, ema.E, len(x_src), cfg.num_domains
    names = list(names) or [str(k) for k in range(K)]
    src_labels, ref_labels = labels or (y_src.tolist(), y_ref.tolist())
    masks, pick = masks_of(fan, x_src), cycle_refs(src_labels, ref_labels, K)
    x_fake = G(x_src, E(x_ref[pick], y_ref[pick]), masks)
    x_rec = G(x_fake, E(x_src, y_src), masks_of(fan, x_fake))
    save_grid(torch.cat([x_src, x_ref[pick], x_fake, x_rec]), out / f"{tag}_cycle.png", nrow=N,
              rows=["source", "reference", "translated", "cycle"])
    if masks is not None:
        save_masks(x_src, masks, out / f"{tag}_masks.png")
    gen, device = torch.Generator().manual_seed(0), x_src.device
    z_avg, z = (torch.randn(n, cfg.latent_dim, generator=gen).to(device) for n in (10000, n_z))
    ys = [torch.full((len(z_avg),), k, device=device) for k in range(K)]
    s_avg = torch.stack([mapping(z_avg, y).mean(0) for y in ys])  # (K, S): ψ truncates toward it
    s_lat = torch.stack([mapping(z, y[:n_z]) for y in ys])  # (K, n_z, S)
    for psi in (0.5, 0.7, 1.0):  # rows: sources, then one row per (domain, z)
        s_psi = torch.lerp(s_avg[:, None], s_lat, psi).flatten(0, 1)  # (K n_z, S)
        rows = [x_src] + [G(x_src, s.expand(N, -1), masks) for s in s_psi]
        save_grid(torch.cat(rows), out / f"{tag}_latent_psi{psi:.1f}.png", nrow=N,
                  rows=["sources"] + [f"{n} z{j}" for n in names for j in range(n_z)])
    save_grid(ref_rows(G, x_src, x_ref, E(x_ref, y_ref), masks), out / f"{tag}_reference.png",
              N + 1, rows=["sources"] + [f"style of {names[k]}" for k in ref_labels])


@torch.no_grad()
def oracle_scores(ema, root, cfg, device, step, fan=None):
    """Toy scenes: read sky (domain), object shape / position / size (content) and colour (style)
    back from pixels (data/toy.read_scenes). Every val image goes to every other domain with a
    latent style and with a random reference's style."""
    x, y = stack_split(root, "val", cfg.img_size)
    gen, K = torch.Generator().manual_seed(0), cfg.num_domains
    src = torch.cat([(y != k).nonzero().squeeze(1) for k in range(K)])
    trg = torch.cat([torch.full(((y != k).sum(),), k) for k in range(K)])
    ref = torch.multinomial((y[None] == trg[:, None]).float(), 1, generator=gen)[:, 0]  # of trg
    x_src, x_ref, y_trg = x[src].to(device), x[ref].to(device), trg.to(device)
    z = torch.randn(2, len(src), cfg.latent_dim, generator=gen).to(device)
    f_lat, f_lat2, f_out_ref = (read_scenes(translate_all(ema.G, x_src, s, fan)) for s in (
        ema.mapping(z[0], y_trg), ema.mapping(z[1], y_trg), ema.E(x_ref, y_trg)))
    f_src, f_ref = read_scenes(x_src), read_scenes(x_ref)

    def pos_err(f):  # per image: mean |Δ| of centre x, centre y, size (fractions of the side)
        return sum((f[k] - f_src[k]).abs() for k in ("cx", "cy", "size")) / 3

    scores = {}
    for mode, f in (("latent", f_lat), ("ref", f_out_ref)):
        err = pos_err(f)
        scores[f"acc_{mode}"] = (f["domain"] == trg).float().mean().item()
        scores[f"shape_kept_{mode}"] = (f["shape"] == f_src["shape"]).float().mean().item()
        scores[f"pos_err_{mode}"] = err[f["valid"]].mean().item()  # over readable outputs
        # Position kept: an object is read and its error is < 0.05 (chance, the error against a
        # random other image, is 0.14); unreadable outputs count as not kept.
        scores[f"pos_kept_{mode}"] = (f["valid"] & (err < 0.05)).float().mean().item()
    scores["color_err_ref"] = (f_out_ref["color"] - f_ref["color"]).abs().mean(1)[
        f_out_ref["valid"]].mean().item()
    scores["diversity_color"] = (f_lat["color"] - f_lat2["color"]).abs().mean().item()
    print(f"oracle @ {step}: " + "\n    ".join(oracle_lines(scores)), flush=True)
    return scores


def oracle_lines(s):
    """The oracle's scores in two lines of under 100 columns (latent / reference styles)."""
    pair = lambda k: f"{s[f'{k}_latent']:.2f}/{s[f'{k}_ref']:.2f}"  # noqa: E731
    err = s["color_err_ref"]  # nan when no output is readable (step 0)
    err = "- (no readable output)" if math.isnan(err) else f"{err:.2f}"
    return [f"latent/ref: sky reached {pair('acc')}, object kept in place {pair('pos_kept')}, "
            f"shape kept {pair('shape_kept')} (chance 0.35)",
            f"colour error vs the reference {err}, colour diversity over z "
            f"{s['diversity_color']:.2f}"]


def read_images(path, img_size, flag):
    """A file or a folder (recursive) of images of any size/mode -> (N, 3, img, img) in [-1, 1];
    unreadable files in a folder are named and skipped."""
    resize = T.Resize([img_size] * 2)
    return torch.stack([to_tensor_norm()(resize(img)) for _, img in load_rgb_files(path, flag)])


def face_aligner(cfg, device):
    """x (N, 3, S, S) -> x aligned like CelebA-HQ: FAN landmarks onto the mean CelebA-HQ ones
    (celeba_lm_mean.npz beside wing.ckpt; both from `python data/download.py wing`)."""
    fan, lm_path = load_fan(cfg.wing, device), Path(cfg.wing).with_name("celeba_lm_mean.npz")
    require(lm_path.is_file(), f"{lm_path}: missing (the mean CelebA-HQ landmarks); get it with "
            "`python data/download.py wing`")
    ref = read_npz(lm_path, "mean").float() * (cfg.img_size / 256)  # (98, 2), given at 256 px
    return lambda x: align_faces(fan, x, ref).to(x.device)


@torch.no_grad()
def align(cfg, ns):
    """Official `align` mode: each --src image resized to img_size and aligned, one PNG per input
    (same name) in --out; unreadable files are named and skipped."""
    require(ns.src and Path(ns.src).exists(), f"--src {ns.src!r}: pass an image file or folder")
    aligner, out = face_aligner(cfg, pick_device(cfg.device)), Path(cfg.out)
    files, resize = ([Path(ns.src)] if Path(ns.src).is_file() else ImageFiles(ns.src).files,
                     T.Resize([cfg.img_size] * 2))
    for f in files:
        try:
            x = to_tensor_norm()(resize(load_rgb(f)))[None]  # (1, 3, S, S)
        except UserError as e:
            print(f"skipped {e}")
            continue
        save_grid(aligner(x), out / f"{f.stem}.png", nrow=1)
        print(f"aligned {f} -> {out / f'{f.stem}.png'}")


def sampling_nets(cfg, ns):
    """(cfg, EMA G/F/E, device, FAN or None) of a run (common.load_run: its checkpoint fixes the
    architecture and data), or of an official release file (settings from --preset and flags)."""
    device = pick_device(cfg.device)
    if ns.official_ckpt:
        fan, (_, ema) = face_net(cfg, device), build_nets(cfg, device)  # no FAN: fails at once
        load_official(ns.official_ckpt, vars(ema))
        return cfg, ema, device, fan

    def ema_nets(cfg, _):  # under their names in last.pt
        return {k + "_ema": net for k, net in vars(build_nets(cfg, device)[1]).items()}

    cfg, nets, _ = load_run(cfg, ns.ckpt, ema_nets, ns.given, FIXED)
    ema = SimpleNamespace(**{k.removesuffix("_ema"): v for k, v in nets.items()})
    return cfg, ema, device, face_net(cfg, device)


@torch.no_grad()
def sample(cfg, ns):
    """--src to --domain: reference grid (--ref) or latent grid (--n-styles), and a style GIF."""
    require(ns.src, "--src: required in sample mode; pass an image file or folder")
    cfg, nets, device, fan = sampling_nets(cfg, ns)
    require(0 <= ns.domain < cfg.num_domains, f"--domain {ns.domain}: use 0..{cfg.num_domains - 1}")
    require(ns.n_styles > 0, f"--n-styles {ns.n_styles}: must be ≥ 1")
    x_src = read_images(ns.src, cfg.img_size, "--src").to(device)  # (N, 3, H, W)
    aligned = face_aligner(cfg, device) if ns.align else (lambda x: x)  # like CelebA-HQ faces
    x_src = aligned(x_src)
    N, out, masks = len(x_src), Path(cfg.out) / "sample", masks_of(fan, x_src)
    if masks is not None:
        save_masks(x_src, masks, out / "masks.png")
    if ns.ref:
        x_ref = aligned(read_images(ns.ref, cfg.img_size, "--ref").to(device))  # (R, 3, H, W)
        styles = nets.E(x_ref, torch.full((len(x_ref),), ns.domain, device=device))  # (R, S)
        save_grid(ref_rows(nets.G, x_src, x_ref, styles, masks), out / "reference.png", N + 1,
                  rows=["sources"] + [f"style of ref {r + 1}" for r in range(len(x_ref))])
    else:
        z = torch.randn(ns.n_styles, cfg.latent_dim, device=device)  # (R, Z)
        styles = nets.mapping(z, torch.full((ns.n_styles,), ns.domain, device=device))  # (R, S)
        grid = [x_src] + [nets.G(x_src, s.expand(N, -1), masks) for s in styles]
        save_grid(torch.cat(grid), out / "latent.png", nrow=N,
                  rows=["sources"] + [f"z {r + 1}" for r in range(len(styles))])
    if len(styles) >= 2:  # GIF weights 0, sigmoid(-5..4.5 step 0.5), then 1 × 10 (official video)
        alphas = [0.0] + torch.sigmoid(torch.arange(-5, 5, 0.5)).tolist() + [1.0] * 10
        frames = [make_grid(nets.G(x_src, torch.lerp(s0, s1, a).expand(N, -1), masks).clamp(-1, 1),
                            nrow=N) for s0, s1 in zip(styles[:-1], styles[1:]) for a in alphas]
        save_gif(frames, out / "interpolation.gif", duration_ms=60)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")


@torch.no_grad()
def evaluate(cfg, ns):
    """Official protocol (metrics/eval.py, calculate_metrics): each src≠trg task, --num-outs
    outputs per val source; LPIPS = mean over output pairs; FID vs all train images of the target
    domain."""
    cfg, nets, device, fan = sampling_nets(cfg, ns)
    root, K = resolve_data(cfg.data, "scenes", cfg.img_size), cfg.num_domains
    inception = InceptionPool(pretrained=not ns.random_weights).to(device)
    lpips = LPIPS("alex", pretrained=not ns.random_weights).to(device).eval()
    label = " (RANDOM backbone weights: not real FID/LPIPS)" if ns.random_weights else ""
    x_val, y_val = stack_split(root, "val", cfg.img_size)
    x_train, y_train = stack_split(root, "train", cfg.img_size)
    feats = lambda x: torch.cat([inception(b.to(device)).cpu() for b in x.split(32)])  # noqa: E731
    res, real_feats = {"latent": [], "reference": []}, {}
    for trg, src in ((t, s) for t in range(K) for s in range(K) if s != t):
        if trg not in real_feats:  # the real side of FID depends on the target domain only
            real_feats[trg] = feats(x_train[y_train == trg])
        real, refs = real_feats[trg], x_val[y_val == trg]
        x_src = x_val[y_val == src][:ns.eval_src or None].to(device)
        n, y = len(x_src), torch.full((len(x_src),), trg, device=device)
        style = dict(  # a fresh z, or a random val reference of the target domain, per output
            latent=lambda: nets.mapping(torch.randn(n, cfg.latent_dim, device=device), y),
            reference=lambda: nets.E(refs[torch.randint(len(refs), (n,))].to(device), y))
        for mode, rows in res.items():
            outs = [translate_all(nets.G, x_src, style[mode](), fan) for _ in range(ns.num_outs)]
            lp = torch.stack([lpips(a, b).mean() for i, a in enumerate(outs) for b in outs[i + 1:]])
            rows.append((frechet_distance(feats(torch.cat(outs)), real), lp.mean().item()))
            print(f"{mode} {src}->{trg}: FID {rows[-1][0]:.2f} | LPIPS {rows[-1][1]:.4f}{label}")
    for mode, rows in res.items():
        print(f"{mode} mean: FID {sum(r[0] for r in rows) / len(rows):.2f} | "
              f"LPIPS {sum(r[1] for r in rows) / len(rows):.4f}{label}")
    if cfg.data in ("", "toy"):
        oracle_scores(nets, root, cfg, device, "eval", fan)
    return res


# ----------------------------------------------------------------------------
# 7. Train
# ----------------------------------------------------------------------------
def console_terms(cfg):
    """What the console line shows (log.jsonl has all 16 terms): L_D = L_real + L_fake + λ_reg R1
    and L_G (Eq. (5)), then L_sty, L_ds, L_cyc and R1, each the mean of the latent and the
    reference step."""
    both = lambda f: lambda v: (f(v, "latent") + f(v, "ref")) / 2  # noqa: E731
    term = lambda net, k: both(lambda v, m: v[f"{net}/{m}_{k}"])  # noqa: E731
    return {"D": both(lambda v, m: v[f"D/{m}_real"] + v[f"D/{m}_fake"]
                      + cfg.lambda_reg * v[f"D/{m}_reg"]),
            "G": both(lambda v, m: g_total(*(v[f"G/{m}_{k}"] for k in ("adv", "sty", "ds", "cyc")),
                                           cfg, v["G/lambda_ds"])),
            "sty": term("G", "sty"), "ds": term("G", "ds"), "cyc": term("G", "cyc"),
            "R1": term("D", "reg")}


def train(cfg, given=()):
    device = init_distributed(cfg.device)  # under torchrun: this process's GPU (or the CPU)
    # Fail early; a resumed run: flags left out keep the saved values (common.resume_config)
    cfg, resume = (cfg, None) if cfg.bench else prepare_run(cfg, given, FIXED)
    seed_everything(cfg.seed)
    fan = face_net(cfg, device, random_ok=cfg.bench)  # None unless w_hpf > 0
    nets, ema = build_nets(cfg, device)
    optims = build_optims(nets, cfg)
    if cfg.bench:
        return bench(nets, ema, optims, cfg, device, fan)
    out, last, toy = Path(cfg.out), Path(cfg.out) / "last.pt", cfg.data in ("", "toy")
    root, src_set, ref_set = domain_sets(cfg)
    all_nets = {**vars(nets), **{k + "_ema": v for k, v in vars(ema).items()}}
    step = start = load_checkpoint(resume, all_nets, optims)["step"] if resume else 0
    check_same_weights(all_nets)  # torchrun: one run, every process from the same weights
    # Sources and references: two independent class-balanced streams, a pure function of (seed,
    # step, rank): a resumed run reads what it would have read; each process reads its rows.
    batches = zip(*(step_loader(d, cfg.batch, cfg.seed, step, balanced=True, device=device,
                                num_workers=cfg.num_workers, name=name)
                    for d, name in ((src_set, "src"), (ref_set, "ref"))))
    x, y = stack_split(root, "val", cfg.img_size, per_domain=4)  # fixed: samples compare over steps
    fixed = fixed_batch(x, y, src_set.domains)
    labels = fixed[1].tolist(), fixed[3].tolist()  # the grids' labels, read once on the CPU
    fixed = [t.to(device) for t in fixed]
    logger = Logger(out, cfg.total_iters, cfg.log_every, console_terms(cfg), start=step)
    t0, losses, scores = time.time(), {}, None
    print(start_line(cfg, device, step, f"{sum(p.numel() for p in nets.G.parameters()):,} G "
                     f"params", f"data {short_path(root)}", f"{len(src_set)} images, domains "
                     f"{src_set.domains}", *([f"face masks from {cfg.wing}"] if fan else [])))

    def progress(step):  # rank 0: sample grids, loss curves, the toy oracle; training RNG kept
        with own_rng(device):
            write_samples(ema, fixed, out / "samples", f"{step:06d}", cfg, fan,
                          names=src_set.domains, labels=labels)
            logger.plot(out / "samples" / "losses.png")  # beside the samples
            if toy and step < cfg.total_iters:
                oracle_scores(ema, root, cfg, device, step, fan)

    try:
        # Before the first step, all the loop does later, once: its problems show in the first
        # minute, and the first grid shows the untrained nets.
        if is_main():
            progress(step)
        check_save(last, step, cfg, all_nets, optims)
        saves = SaveTimer(cfg.save_every, cfg.save_minutes, cfg.total_iters, cfg.log_every)
        logger.t0 = time.time()  # its it/s and ETA: training steps only
        while step < cfg.total_iters:
            # Not converted to channels_last: NHWC weights make cuDNN's convs run NHWC anyway.
            src, ref = next_batch(batches)  # torchrun: a data error or Ctrl-C stops all here
            batch = [t.to(device, non_blocking=True) for t in (*src, *ref)]
            losses = train_step(nets, ema, optims, batch, step, cfg, fan)
            step += 1
            if step % cfg.log_every == 0:
                losses = mean_over_ranks(losses)  # torchrun: logged and checked on every process
                logger.log(step, losses)
                check_finite(losses, step, last)  # never train on for thousands of nan steps
            if (step % cfg.sample_every == 0 or step == cfg.total_iters) and is_main():
                progress(step)
            if saves.due(step):  # every save_every steps and every save_minutes
                save_checkpoint(last, step, cfg, all_nets, optims, losses=losses)
    except KeyboardInterrupt:  # keep the work done so far, if finite (else: one-line error)
        save_checkpoint(last, step, cfg, all_nets, optims, losses=losses, interrupted=True)
        print()  # after the ^C
    except Exception as e:  # a bug: last.pt is left as it was (never a half-done step)
        report_crash(e, step, last)
        raise
    else:  # after Ctrl-C the user wants out at once: no oracle
        scores = oracle_scores(ema, root, cfg, device, step, fan) if toy and is_main() else None
    if not is_main():  # torchrun: rank 0 reports for the whole run
        return None
    me, samples = Path(__file__).name, sorted((out / "samples").glob("*_cycle.png"))[-1:]
    src = short_path(DomainFolder(root, "val").files[0])  # domain 0's first val image
    print_summary(me, step, start, time.time() - t0, [
        ("samples", [p.with_name(p.name.replace("cycle", k)) for p in samples for k in (
            "cycle", "reference", "latent_psi1.0", "latent_psi0.7", "latent_psi0.5", "masks")]),
        ("loss curves", [out / "samples" / "losses.png"]),
        ("checkpoint", [last, out / "log.jsonl"])],
        oracle_lines(scores) if scores else "", [
        (f"python {me} sample --out {out} --src {src} --domain 1", "4 styles of domain 1"),
        (f"python {me} eval --out {out}", "FID, LPIPS" + (" and the oracle" if toy else "")),
        (f"python {me} --out {out} --resume auto --total-iters {2 * cfg.total_iters}",
         "train on")], step < cfg.total_iters)
    return scores


def bench(nets, ema, optims, cfg, device, fan=None):
    """Warm-up + cfg.bench_iters timed iterations on random data; FLOPs of one iteration."""
    B, H, K, cuda = cfg.batch, cfg.img_size, cfg.num_domains, device.type == "cuda"
    x, y = torch.rand(3, B, 3, H, H, device=device) * 2 - 1, torch.randint(K, (2, B), device=device)
    batch = (x[0], y[0], x[1], x[2], y[1])
    sync = lambda: torch.cuda.synchronize(device) if cuda else None  # noqa: E731
    train_step(nets, ema, optims, batch, 0, cfg, fan)  # warm-up (the counted step warms up too)
    with flop_counter() as counter:
        train_step(nets, ema, optims, batch, 1, cfg, fan)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    for step in range(cfg.bench_iters):
        losses = train_step(nets, ema, optims, batch, step, cfg, fan)
    sync()
    its, N = cfg.bench_iters / (time.perf_counter() - t0), world_size()  # torchrun: global
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a"
    print(f"bench {device} img {H} batch {B}{f' × {N} processes' if N > 1 else ''}: {sig3(its)} "
          f"it/s | {sig3(its * B * N)} images/s | peak mem {mem} | "
          f"{sig3(counter.get_total_flops() * its * N / 1e12)} TFLOP/s")
    return losses


# ----------------------------------------------------------------------------
# 8. Entry point
# ----------------------------------------------------------------------------
EXTRA = [((f"--{flag}",), dict(default=default, type=type(default), help=text)) for flag, default,
         text in (("ckpt", "", "sample/eval: our last.pt (default: <out>/last.pt)"),
                  ("official-ckpt", "", "sample/eval: official *_nets_ema.ckpt"),
                  ("src", "", "sample/align: source image file or folder"),
                  ("ref", "", "sample: reference image file or folder (of --domain)"),
                  ("domain", 0, "sample: target domain index"),
                  ("n-styles", 4, "sample: latent styles when no --ref"),
                  ("num-outs", 10, "eval: outputs per source image"),
                  ("eval-src", 0, "eval: sources per task (0 = all val)"))]
EXTRA += [(("--random-weights",), dict(action="store_true",
                                       help="eval: random Inception/LPIPS weights (offline only)")),
          (("--align",), dict(action="store_true", help="sample: align faces like CelebA-HQ"))]


def main(argv=None):
    modes, argv = ("train", "sample", "eval", "align"), sys.argv[1:] if argv is None else argv
    cfg, ns = parse_config(Config, PRESETS, argv, __doc__, modes, EXTRA)
    if ns.mode == "align" and ns.preset == "toy":  # faces: CelebA-HQ's settings (256 px) unless set
        cfg, ns = parse_config(Config, PRESETS, ["--preset", "celeba_hq", *argv], __doc__, modes,
                               EXTRA)
    check_flags(cfg, positive="batch lr f_lr total_iters ds_iter log_every sample_every "
                "save_every", nonneg="num_workers weight_decay save_minutes",
                unit="beta1 beta2 ema_beta")
    require(cfg.img_size >= 8 and cfg.img_size & (cfg.img_size - 1) == 0, f"--img-size "
            f"{cfg.img_size}: must be a power of two ≥ 8 (E and D halve it down to 4×4)")
    return {"sample": sample, "eval": evaluate, "align": align}.get(
        ns.mode, lambda c, n: train(c, n.given))(cfg, ns)


if __name__ == "__main__":
    main_guard(main)

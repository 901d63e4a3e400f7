"""StarGAN: Unified Generative Adversarial Networks for Multi-Domain Image-to-Image Translation
(Choi et al., CVPR 2018, arXiv:1711.09020v3). Read beside §3 (Eqs. 1-8), §3.2 (mask vector), §4.
Symbols: x → x_real, c → c_trg, c' → c_org, G(x, c) → x_fake, G(G(x, c), c') → x_rec, D_src /
D_cls → D's two outputs, m → mask vector. Shapes: B batch, H = W size, A labels, R repeat_num.
  python 01_stargan_v1.py --out runs/toy [--resume auto]   # toy faces (CPU); resume is exact
  python 01_stargan_v1.py --data data/celeba --out runs/celeba          # the paper's CelebA 128 px
  torchrun --nproc_per_node 8 01_stargan_v1.py --data data/celeba --batch 2   # 8 GPUs × 2 = 16
  python 01_stargan_v1.py --data toy --data2 toy --out runs/joint       # mask vector: faces+shapes
  python 01_stargan_v1.py sample --out runs/toy --src face.jpg [--attrs-set Blond_Hair=1,Male=0]
  python 01_stargan_v1.py sample --ckpt stargan_v1_celeba_128/200000-G.ckpt --src pics/  # official
  python 01_stargan_v1.py eval --out runs/toy --train-classifier       # ResNet-18 + oracle scores
  python 01_stargan_v1.py --bench                                       # one line: it/s, TFLOP/s
Builds on: nothing here; first in the reading order 01 → 03 → 04 → 02. It teaches one G for
many domains, G(x, c) with the target label c, which 02 keeps.
Expected: default toy run (4000 steps, 32 px; grids in runs/stargan_v1/): the oracle reads the
target attribute in 99.5-100 % (Black/Blond/Brown_Hair, Male) and 97-100 % (Young) of
translations (seeds 0-2), and 99.5-100 % of them are readable.
Copied: parameter counts equal the official ones (128 px, A = 5): G 8,430,528, D 44,762,048.
Deviations: IN keeps no running stats (official tracks, never uses them); the lr decays linearly
to 0 over the last 100k iterations as in the paper (official code: -0.1 % in all); toy: 4x lr.
"""
import contextlib
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import Subset

from common import (Logger, SaveTimer, UserError, autocast, average_gradients, check_finite,
                    check_flags, check_same_weights, check_save, flop_counter, gather_batch,
                    init_distributed, is_main, load_checkpoint, load_run, main_guard,
                    mean_over_ranks, next_batch, own_rng, parse_config, pick_device, prepare_run,
                    print_summary, read_checkpoint, report_crash, require, save_checkpoint,
                    save_grid, seed_everything, shard_draw, short_path, sig3, start_line,
                    world_size)
from data.datasets import (CelebAAttrs, DomainFolder, infinite, load_rgb_files, make_loader,
                           resolve_data, step_loader, to_tensor_norm)
from data.toy import FACE_ATTRS, read_faces

# ----------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------
@dataclass
class Config:
    data: str = ""  # CelebA root (list_attr_celeba.txt) or domain folders; "" or "toy" -> toy faces
    data2: str = ""  # second dataset, joint training with the mask vector (§3.2); "toy" -> shapes
    attrs: tuple[str, ...] = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")  # CelebA c
    img_size: int = 128  # images are centre-cropped to 178 (CelebA) and resized to this
    g_conv_dim: int = 64  # G base width
    d_conv_dim: int = 64  # D base width
    g_repeat_num: int = 6  # residual blocks in G
    d_repeat_num: int = 6  # stride-2 convs in D (D_src patch map is img_size / 2^R)
    lambda_cls: float = 1.0  # λ_cls, Eqs. (5)-(6)
    lambda_rec: float = 10.0  # λ_rec, Eq. (6)
    lambda_gp: float = 10.0  # λ_gp, Eq. (8)
    n_critic: int = 5  # D updates per G update (§4)
    batch: int = 16  # batch per process (§4: 16); global batch = N processes × batch
    g_lr: float = 1e-4  # Adam lr of G (§4)
    d_lr: float = 1e-4  # Adam lr of D (§4)
    beta1: float = 0.5  # Adam β1 (§4)
    beta2: float = 0.999  # Adam β2 (§4)
    total_iters: int = 200000  # D iterations (G updates = total_iters / n_critic)
    decay_iters: int = 100000  # linear lr decay to 0 over the last decay_iters iterations
    seed: int = 0  # random seed
    out: str = "runs/stargan_v1"  # run folder (last.pt, samples, log.jsonl)
    resume: str = ""  # "" fresh, "auto" out/last.pt if present, or a checkpoint path
    overwrite: bool = False  # allow starting fresh in a folder that holds last.pt
    device: str = "auto"  # auto, cpu or cuda
    amp: bool | None = None  # bf16 autocast: default CUDA only; --amp on the CPU too
    num_workers: int = 0  # data loader workers
    log_every: int = 100  # iterations between log lines
    sample_every: int = 1000  # iterations between sample grids
    save_every: int = 10000  # iterations between checkpoints
    save_minutes: float = 30.0  # and minutes of wall time between them (0: by iterations only)
    bench: bool = False  # time training iterations on random data instead of training
    compile: bool = False  # torch.compile G (D stays eager: WGAN-GP's double backward)
    bench_iters: int = 20  # timed iterations for --bench
    cls_iters: int = 2000  # iterations of the ResNet-18 evaluation classifier (eval)


# Toy: CPU minutes: narrow nets, 4x lr, 800 G updates; the rest as the paper. At 400 G updates
# (2000 steps) grey hair turned black in only 80-94 % of translations, depending on the machine.
PRESETS = {"toy": dict(
    img_size=32, g_conv_dim=16, d_conv_dim=16, g_repeat_num=2, d_repeat_num=4, g_lr=4e-4,
    d_lr=4e-4, total_iters=4000, decay_iters=2000, log_every=100, sample_every=500, save_every=500,
    cls_iters=300)}
# Resume, sample and eval refuse a change of these (the weights or the labels would not fit);
# any other given flag is applied (common.run_config).
FIXED = ("data", "data2", "attrs", "img_size", "g_conv_dim", "d_conv_dim", "g_repeat_num",
         "d_repeat_num")


# ----------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------
def conv_in_relu(conv, relu=True):  # Deviation: IN keeps no running stats (official: unused)
    return [conv, nn.InstanceNorm2d(conv.out_channels, affine=True)] + [nn.ReLU(True)] * relu


class ResidualBlock(nn.Module):
    """x + [Conv3 → IN → ReLU → Conv3 → IN]; no activation after the sum (official)."""
    def __init__(self, dim):
        super().__init__()
        conv = [nn.Conv2d(dim, dim, 3, 1, 1, bias=False) for _ in "12"]
        self.main = nn.Sequential(*conv_in_relu(conv[0]), *conv_in_relu(conv[1], relu=False))

    def forward(self, x):
        return x + self.main(x)  # (B, C, H, W)


class Generator(nn.Module):
    """G(x, c): 2 downsamplings → R residual blocks → 2 upsamplings → tanh (official indices)."""
    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers, d = conv_in_relu(nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False)), conv_dim
        for _ in range(2):  # H → H/4, width ×4
            layers, d = layers + conv_in_relu(nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False)), 2 * d
        layers += [ResidualBlock(d) for _ in range(repeat_num)]  # (B, 4·conv_dim, H/4, W/4)
        for _ in range(2):  # H/4 → H
            up = nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False)
            layers, d = layers + conv_in_relu(up), d // 2
        self.main = nn.Sequential(*layers, nn.Conv2d(d, 3, 7, 1, 3, bias=False), nn.Tanh())

    def forward(self, x, c):
        """x (B, 3, H, W) in [-1, 1], c (B, c_dim) -> (B, 3, H, W) in [-1, 1]."""
        B, _, H, W = x.shape
        # The label is tiled and concatenated, not added: every pixel of the first conv sees it.
        c = c.to(x.dtype).view(B, -1, 1, 1).expand(-1, -1, H, W)  # (B, c_dim, H, W)
        return self.main(torch.cat([x, c], dim=1))  # (B, 3 + c_dim, H, W) -> (B, 3, H, W)


class Discriminator(nn.Module):
    """PatchGAN critic D_src plus auxiliary domain classifier D_cls on one trunk (§3, Fig. 3)."""
    def __init__(self, image_size=128, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        layers, d = [nn.Conv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)], conv_dim
        for _ in range(1, repeat_num):  # halve H, double width: 128 → 2 at the official setting
            layers, d = layers + [nn.Conv2d(d, 2 * d, 4, 2, 1), nn.LeakyReLU(0.01)], 2 * d
        self.main, k = nn.Sequential(*layers), image_size // 2 ** repeat_num  # k: final map size
        self.conv1 = nn.Conv2d(d, 1, 3, 1, 1, bias=False)  # D_src: one score per patch
        self.conv2 = nn.Conv2d(d, c_dim, k, bias=False)  # D_cls: kernel covers the whole map

    def forward(self, x):
        """x (B, 3, H, W) -> D_src (B, 1, H/2^R, W/2^R) critic scores, D_cls (B, c_dim) logits."""
        h = self.main(x)  # (B, conv_dim·2^(R-1), H/2^R, W/2^R)
        return self.conv1(h), self.conv2(h).flatten(1)  # (B, 1, H/2^R, W/2^R), (B, c_dim)


# ----------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------
def adv_loss_d(src_real, src_fake):
    """Eq. (8), D side without GP: −E[D_src(x)] + E[D_src(G(x, c))] (D maximises L_adv)."""
    return -src_real.mean() + src_fake.mean()


def adv_loss_g(src_fake):
    """Eq. (8), the term that depends on G: L_adv = −E[D_src(G(x, c))] (G minimises L_adv)."""
    return -src_fake.mean()


def gradient_penalty(D, x_real, x_fake, alpha):
    """Eq. (8): E[(‖∇_x̂ D_src(x̂)‖₂ − 1)²], x̂ = α x + (1 − α) G(x, c) on lines between real and
    fake samples; alpha (B, 1, 1, 1) ~ U[0, 1], drawn by the caller."""
    # x_fake is bf16 under autocast, x_real fp32: lerp (no autocast rule) needs one dtype
    x_hat = torch.lerp(x_fake.detach().to(x_real.dtype), x_real, alpha).requires_grad_(True)
    src = D(x_hat)[0]
    grad = torch.autograd.grad(src.float().sum(), x_hat, create_graph=True)[0]  # (B, 3, H, W)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def cls_loss(logits, c, multi_label):
    """Eqs. (2)-(3): −log D_cls(c|x); CelebA: BCE summed over attributes (official); domains: CE."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), c, reduction="sum") / len(c)
    return F.cross_entropy(logits.float(), c.argmax(1))


def rec_loss(x_real, x_rec):
    """Eq. (4): L_rec = E[‖x − G(G(x, c), c')‖₁] (mean absolute error, as official)."""
    return (x_real.float() - x_rec.float()).abs().mean()  # fp32, also under bf16 autocast


def lr_at(step, lr0, cfg):
    """§4: lr0, then linear to 0 over the last decay_iters; Deviation: official decays 0.1 %."""
    return lr0 * min(1.0, max(0.0, (cfg.total_iters - step) / cfg.decay_iters))


def mask_label(c, k, sizes):
    """§3.2: c̃ = [c_1, .., c_n, m], c_k = c, others 0, m = one-hot(k); one dataset: c itself."""
    if len(sizes) < 2:
        return c
    B, parts = c.size(0), [c if i == k else c.new_zeros(c.size(0), n) for i, n in enumerate(sizes)]
    m = F.one_hot(torch.full((B,), k, device=c.device), len(sizes)).to(c.dtype)  # (B, n_sets)
    return torch.cat(parts + [m], dim=1)  # (B, sum(sizes) + n_sets)


def known_logits(logits, k, sizes):  # §3.2: D classifies only dataset k's labels (sizes=(): all)
    return logits[:, sum(sizes[:k]):sum(sizes[:k + 1])] if sizes else logits  # (B, sizes[k])


# ----------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------
HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")  # exclusive CelebA attributes
Source = namedtuple("Source", "names multi train test", defaults=(None, None))  # multi: CelebA


def image_transform(img_size, split="test"):  # official: (CelebA crop 178) → resize → flip → ±1
    flip = [T.RandomHorizontalFlip()] if split == "train" else []
    return T.Compose([T.Resize(img_size), T.CenterCrop(img_size), *flip, to_tensor_norm()])


def make_sources(cfg):
    """--data (toy: faces), --data2 (mask vector; toy: shapes): CelebA attributes or domains."""
    for data, kind in ((cfg.data, "faces"), (cfg.data2, "shapes"))[:1 + bool(cfg.data2)]:
        root = resolve_data(data, kind, cfg.img_size)
        multi = CelebAAttrs.table(root) is not None
        splits = ("train", "test" if multi else "val")  # CelebA: the official split of the rows
        sets = [CelebAAttrs(root, list(cfg.attrs), s, image_transform(cfg.img_size, s)) if multi
                else DomainFolder(root, s, image_transform(cfg.img_size, s)) for s in splits]
        yield Source(sets[0].attr_names if multi else sets[0].domains, multi, *sets)


def fixed_rows(data, n=8):
    """The fixed debug batch: the first n images (CelebA), or each domain's images in turn, so
    every domain shows, whatever the sizes of the val folders."""
    y = getattr(data, "targets", None)
    if y is None:
        return list(range(min(n, len(data))))
    rank = [y[:i].count(t) for i, t in enumerate(y)]  # the image's place in its domain
    return sorted(range(len(y)), key=lambda i: (rank[i], y[i]))[:n]


def as_label(y, multi, n, logits=False):  # (B, n) float labels from attributes, indices, logits
    y = (y > 0 if multi else y.argmax(1)) if logits else y
    return y.float() if multi else F.one_hot(y, n).float()


# ----------------------------------------------------------------------------
# 5. Steps
# ----------------------------------------------------------------------------
def d_step(G, D, opt_d, x_real, c_org, c_trg, cfg, k=0, sizes=(), multi=True):
    """Eq. (5) with Eq. (8): L_D = −L_adv + λ_cls·L_cls^r. Updates D only (G runs without grad)."""
    with autocast(x_real.device, cfg.amp):
        with torch.no_grad():
            x_fake = G(x_real, mask_label(c_trg, k, sizes))  # (B, 3, H, W)
        (src_real, cls_real), (src_fake, _) = D(x_real), D(x_fake)  # (B, 1, h, w), (B, ΣA)
        loss_adv = adv_loss_d(src_real.float(), src_fake.float())  # = −L_adv without the GP term
        loss_cls = cls_loss(known_logits(cls_real, k, sizes), c_org, multi)  # Eq. (2), real x
        # α (B, 1, 1, 1); under torchrun this process's rows of the global batch's draw
        alpha = shard_draw(lambda n: torch.rand(n, 1, 1, 1, device=x_real.device), len(x_real))
        loss_gp = gradient_penalty(D, x_real, x_fake, alpha)
    loss = loss_adv + cfg.lambda_gp * loss_gp + cfg.lambda_cls * loss_cls  # −L_adv + λ_cls L_cls^r
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(opt_d)  # torchrun: the global batch's gradient
    opt_d.step()
    return {"D/adv": loss_adv.detach(), "D/gp": loss_gp.detach(), "D/cls": loss_cls.detach()}


def g_step(G, D, opt_g, x_real, c_org, c_trg, cfg, k=0, sizes=(), multi=True):
    """Eq. (6): L_G = L_adv + λ_cls·L_cls^f + λ_rec·L_rec. Updates G only: D is frozen here."""
    D.requires_grad_(False)  # D only scores; no D gradients are computed or applied
    with autocast(x_real.device, cfg.amp):
        x_fake = G(x_real, mask_label(c_trg, k, sizes))  # (B, 3, H, W)
        src_fake, cls_fake = D(x_fake)
        x_rec = G(x_fake, mask_label(c_org, k, sizes))  # back to the original label, Eq. (4)
        loss_adv = adv_loss_g(src_fake.float())
        loss_cls = cls_loss(known_logits(cls_fake, k, sizes), c_trg, multi)  # Eq. (3), fake x
        loss_rec = rec_loss(x_real, x_rec.float())
    loss = loss_adv + cfg.lambda_cls * loss_cls + cfg.lambda_rec * loss_rec
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(opt_g)  # torchrun: the global batch's gradient
    opt_g.step()
    D.requires_grad_(True)
    return {"G/adv": loss_adv.detach(), "G/cls": loss_cls.detach(), "G/rec": loss_rec.detach()}


def train_step(G, D, opt_g, opt_d, x_real, c_org, step, cfg, k=0, sizes=(), multi=True):
    """One iteration on dataset k: a D step, and a G step every n_critic iterations (§4). The
    targets are the batch's labels shuffled (official); under torchrun the global batch's."""
    c_all = gather_batch(c_org)  # (N·B, A); one process: c_org itself
    c_trg = shard_draw(lambda n: c_all[torch.randperm(n, device=c_org.device)], len(c_org))
    batch = (x_real, c_org, c_trg, cfg, k, sizes, multi)
    losses = d_step(G, D, opt_d, *batch)
    if (step + 1) % cfg.n_critic == 0:
        losses |= g_step(G, D, opt_g, *batch)
    return losses


def build_nets(cfg, sizes, device):
    """nets.G sees [c_1, .., c_n, m] (the mask only with n > 1 datasets); nets.D classifies
    c_1..c_n. sizes: the label count of each dataset."""
    n, R = len(sizes), cfg.d_repeat_num
    require(cfg.img_size % 4 == 0 and cfg.img_size >= 2 ** R, f"--img-size {cfg.img_size}: D "
            f"halves it {R} times (--d-repeat-num) and G needs a multiple of 4; use a multiple of "
            f"4 ≥ {2 ** R}, or a smaller --d-repeat-num (the toy preset: 32 px, 4)")
    G = Generator(cfg.g_conv_dim, sum(sizes) + (n if n > 1 else 0), cfg.g_repeat_num).to(device)
    D = Discriminator(cfg.img_size, cfg.d_conv_dim, sum(sizes), cfg.d_repeat_num).to(device)
    if cfg.compile:  # in place: the state_dict keeps its names
        G.compile()
    return SimpleNamespace(G=G, D=D)


def build_optims(nets, cfg):
    """Adam (β1, β2) for G and D at their own lrs (§4); fused kernels on CUDA."""
    fast = {"fused" if next(nets.G.parameters()).is_cuda else "foreach": True}
    return {k: torch.optim.Adam(getattr(nets, k).parameters(), lr, (cfg.beta1, cfg.beta2), **fast)
            for k, lr in (("G", cfg.g_lr), ("D", cfg.d_lr))}


# ----------------------------------------------------------------------------
# 6. Sampling
# ----------------------------------------------------------------------------
def load_official(path, net):
    """Official *-G.ckpt / *-D.ckpt (yunjey/stargan) into our G / D; IN running stats dropped."""
    state, stats = read_checkpoint(path, ours=False), ("running_mean", "running_var", "_tracked")
    try:
        net.load_state_dict({k: v for k, v in state.items() if not k.endswith(stats)})
    except (RuntimeError, TypeError, AttributeError) as e:  # a file of another kind
        raise UserError(f"{path}: not a checkpoint of this script, nor an official *-G.ckpt "
                        f"for these --attrs ({str(e).splitlines()[0][:120]})") from None
    return net


def target_labels(c_org, names, multi, combo=False):
    """Official create_labels: one target per label, hair exclusive, other attributes flipped."""
    excl = [j for j, a in enumerate(names) if a in HAIR or not multi]  # one-hot among these
    targets = [c_org.clone() for _ in names]
    for j, c in enumerate(targets):
        c[:, excl if j in excl else []] = 0
        c[:, j] = 1 if j in excl else 1 - c_org[:, j]
    if combo and multi and len(names) > 1:  # + first hair colour with all the others flipped
        is_hair = torch.tensor([j in excl for j in range(len(names))], device=c_org.device)
        targets.append(torch.where(is_hair, targets[excl[0]] if excl else c_org, 1 - c_org))
    return targets


@torch.no_grad()
def target_names(names, multi, combo=False):
    """Column titles for target_labels' targets: a hair colour is set, another attribute flipped
    ("±Male"), a domain is set; the combo column sets the first hair colour and flips the rest."""
    short = [n.replace("_Hair", "") for n in names]
    titles = [t if n in HAIR or not multi else f"±{t}" for n, t in zip(names, short)]
    hair = [t for n, t in zip(names, short) if n in HAIR]
    combo = combo and multi and len(names) > 1
    return titles + ([f"{hair[0] if hair else ''} ±all"] if combo else [])


def save_translations(G, x_real, c_org, sources, path, labels=None, titles=None):
    """Per image: x, then G(x, c̃) per masked label (§3.2); default: all targets of all datasets.
    The columns are titled (input, then each target); labels given: titles names them."""
    sizes = [len(s.names) for s in sources]
    c0 = [c_org] + [c_org.new_zeros(len(c_org), n) for n in sizes[1:]]  # the others: from all 0
    if labels is None:
        labels = [mask_label(c, k, sizes) for k, s in enumerate(sources)
                  for c in target_labels(c0[k], s.names, s.multi, k == 0)]
        titles = [t for k, s in enumerate(sources) for t in target_names(s.names, s.multi, k == 0)]
    cols = [x_real] + [G(x_real, c) for c in labels]
    save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=len(cols),  # (B·cols, 3, H, W)
              cols=["input"] + list(titles or ["target"] * len(labels)))
    print(f"wrote {path}: {len(x_real)} images x {len(cols) - 1} targets")


def oracle_judge(cfg, src):
    """Toy faces: the oracle reads labels from pixels -> (B, A) in {0, 1}, -1 if unreadable."""
    if cfg.data not in ("", "toy") or not set(src.names) <= set(FACE_ATTRS):
        return None
    cols = [FACE_ATTRS.index(a) for a in src.names]
    return lambda x: (r := read_faces(x))["attrs"][:, cols].masked_fill(~r["valid"][:, None], -1)


@torch.no_grad()
def translation_scores(G, src, sizes, judge, title):
    """Test split: real labels judge reads right; per j: G(x, c_j) read as j; readable (valid)."""
    A, device, n = len(src.names), next(G.parameters()).device, 0
    hits = dict.fromkeys(["real", *src.names, "valid"], 0.0)
    for x, y in make_loader(src.test, 50, shuffle=False, drop_last=False):
        x, c_org, n = x.to(device), as_label(y, src.multi, A).to(device), n + len(x)
        hits["real"] += (judge(x) == c_org.cpu()).float().mean(1).sum().item()
        for j, c in enumerate(target_labels(c_org, src.names, src.multi)):
            pred = judge(G(x, mask_label(c, 0, sizes)).float())  # (B, A); -1: unreadable
            hits[src.names[j]] += (pred[:, j] == c[:, j].cpu()).sum().item()
            hits["valid"] += (pred >= 0).all(1).sum().item() / A
    line = " | ".join(f"{k} {100 * v / n:.1f}%" for k, v in hits.items())
    print(f"{title}: {line}")
    return line


def evaluate(G, D, sources, cfg, ns, device):
    """§4.5: a ResNet-18 trained from scratch on real images judges translations (toy: oracle)."""
    src, A = next(make_sources(cfg)), len(sources[0].names)
    judges = {"oracle": oracle_judge(cfg, src)} if oracle_judge(cfg, src) else {}
    require(judges or ns.train_classifier, "eval needs --train-classifier (trains the ResNet-18)")
    if ns.train_classifier:
        net = torchvision.models.resnet18(num_classes=A).to(device)
        data = infinite(make_loader(src.train, min(32, len(src.train))))
        adam = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(cfg.cls_iters):
            x, y = (t.to(device) for t in next(data))
            adam.zero_grad(set_to_none=True)
            cls_loss(net(x), as_label(y, src.multi, A), src.multi).backward()
            adam.step()
        judges["ResNet-18"] = lambda x: as_label(net.eval()(x), src.multi, A, logits=True).cpu()
    for title, judge in judges.items():
        translation_scores(G, src, [len(s.names) for s in sources], judge, title)


@torch.no_grad()
def sample_own(G, D, sources, cfg, ns, device):
    """Own images (file or folder) → every target label, or the one given by --attrs-set."""
    sizes, (names, multi), labels = [len(s.names) for s in sources], sources[0][:2], None
    require(ns.src, "sample needs --src: an image file or a folder of images")
    images = [img for _, img in load_rgb_files(ns.src)]  # unreadable files named and skipped
    x_real = torch.stack([image_transform(cfg.img_size)(img) for img in images]).to(device)
    logits = known_logits(D(x_real)[1], 0, sizes) if D else x_real.new_zeros(len(images), sizes[0])
    c = (c_org := as_label(logits, multi, sizes[0], logits=True)).clone()  # c_org: D_cls's guess
    for name, _, value in (item.partition("=") for item in filter(None, ns.attrs_set.split(","))):
        require(name in names and value in ("0", "1"), f"--attrs-set {name}: NAME=0|1, {names=}")
        exclusive = [j for j, a in enumerate(names) if not multi or a in HAIR and name in HAIR]
        c[:, exclusive if value == "1" else []] = 0
        c[:, names.index(name)], labels = float(value), [mask_label(c, 0, sizes)]
    save_translations(G, x_real, c_org, sources, Path(cfg.out) / "sample_own.jpg", labels,
                      [ns.attrs_set.replace("_Hair", "")] if labels else None)


def trained_nets(cfg, ns, device):
    """sample / eval -> (G, D, sources, cfg) of a run (common.load_run: its checkpoint fixes the
    architecture and data), or of an official *-G.ckpt (CelebA --attrs; no D: c_org is all 0)."""
    def sources(c, extra):  # the datasets the run was trained on
        return [Source(*s) for s in zip(extra.get("names", [list(c.attrs)]),
                                        extra.get("multi", [True]))]

    def nets(c, extra):
        return vars(build_nets(c, [len(s.names) for s in sources(c, extra)], device))

    def official(path, nets):
        return {"G": load_official(path, nets["G"]), "D": None}

    cfg, nets, extra = load_run(cfg, ns.ckpt, nets, ns.given, FIXED, official)
    return nets["G"], nets["D"], sources(cfg, extra), cfg


# ----------------------------------------------------------------------------
# 7. Train
# ----------------------------------------------------------------------------
def console_terms(cfg):
    """What the console line shows (log.jsonl has every term, of both datasets): the totals
    L_D (Eq. (7): −L_adv + λ_cls L_cls^r, and λ_gp GP) and L_G (Eq. (6)), GP, both L_cls, L_rec."""
    return {"D": lambda v: v["D/adv"] + cfg.lambda_gp * v["D/gp"] + cfg.lambda_cls * v["D/cls"],
            "G": lambda v: v["G/adv"] + cfg.lambda_cls * v["G/cls"] + cfg.lambda_rec * v["G/rec"],
            "gp": "D/gp", "clsD": "D/cls", "clsG": "G/cls", "rec": "G/rec"}


def train(cfg, device, given=()):
    """n_critic D steps per G step (§4); with two datasets each iteration visits both (§3.2)."""
    cfg, ckpt = prepare_run(cfg, given, FIXED)  # a resumed run: flags left out keep saved values
    seed_everything(cfg.seed)
    sources = list(make_sources(cfg))
    nets = build_nets(cfg, sizes := [len(s.names) for s in sources], device)
    opts, last = build_optims(nets, cfg), Path(cfg.out) / "last.pt"
    (G, D), (opt_g, opt_d), nets = (nets.G, nets.D), (opts["G"], opts["D"]), vars(nets)  # by name
    step = start = load_checkpoint(ckpt, nets, opts)["step"] if ckpt else 0
    check_same_weights(nets)  # torchrun: one run, every process from the same weights
    extra = {"names": [s.names for s in sources], "multi": [s.multi for s in sources]}
    # One batch per dataset and step, a pure function of (seed, step, rank): resume is exact
    streams = zip(*(step_loader(s.train, cfg.batch, cfg.seed, step, num_workers=cfg.num_workers,
                                device=device, name=str(k)) for k, s in enumerate(sources)))
    rows = fixed_rows(sources[0].test)  # fixed debug batch, as official
    x_fix, y_fix = next(iter(make_loader(Subset(sources[0].test, rows), len(rows), False)))
    x_fix, c_fix = x_fix.to(device), as_label(y_fix, sources[0].multi, sizes[0]).to(device)
    logger = Logger(cfg.out, cfg.total_iters, cfg.log_every, console_terms(cfg), start=step)
    t0, losses, stopped = time.time(), {}, False
    print(start_line(cfg, device, step, *(f"{len(s.train)} images, labels {' '.join(s.names)}"
                                          for s in sources)))

    def progress(step, oracle=False):  # rank 0: the grid, the loss curves; training RNG kept
        with own_rng(device):
            save_translations(G, x_fix, c_fix, sources, last.parent / f"sample_{step:06d}.jpg")
            logger.plot(last.parent / "losses.png")  # beside the samples
            if oracle and (judge := oracle_judge(cfg, sources[0])):
                translation_scores(G, sources[0], sizes, judge, f"oracle @ {step}")

    try:
        # Before the first step, all the loop (and its end) does later, once: problems show in
        # the first minute, and the first grid shows the untrained G.
        if is_main():
            progress(step, oracle=True)
        check_save(last, step, cfg, nets, opts, extra)
        saves = SaveTimer(cfg.save_every, cfg.save_minutes, cfg.total_iters, cfg.log_every)
        logger.t0 = time.time()  # its it/s and ETA: training steps only
        while step < cfg.total_iters:
            for optim, lr0 in ((opt_g, cfg.g_lr), (opt_d, cfg.d_lr)):  # one param group each
                optim.param_groups[0]["lr"] = lr_at(step, lr0, cfg)
            losses = {}
            batches = next_batch(streams)  # torchrun: a data error or Ctrl-C stops all here
            for k, (s, batch) in enumerate(zip(sources, batches)):  # alternate datasets, §3.2
                x_real, y = (t.to(device) for t in batch)
                terms = train_step(G, D, opt_g, opt_d, x_real, as_label(y, s.multi, sizes[k]),
                                   step, cfg, k, sizes, s.multi)
                losses.update({n + str(k + 1)[:k]: v for n, v in terms.items()})
            step += 1
            if step % cfg.log_every == 0:
                losses = mean_over_ranks(losses)  # torchrun: logged and checked on every process
                logger.log(step, losses)
                check_finite(losses, step, last)  # never train on for thousands of nan steps
            if (step % cfg.sample_every == 0 or step == cfg.total_iters) and is_main():
                progress(step)
            if saves.due(step):  # every save_every iterations and every save_minutes
                save_checkpoint(last, step, cfg, nets, opts, extra, losses)
    except KeyboardInterrupt:  # keep the work done so far, if finite (else: one-line error)
        save_checkpoint(last, step, cfg, nets, opts, extra, losses, interrupted=True)
        stopped = True
    except Exception as e:  # a bug: last.pt is left as it was (never a half-done step)
        report_crash(e, step, last)
        raise
    if not is_main():  # torchrun: rank 0 reports for the whole run
        return
    judge = None if stopped else oracle_judge(cfg, sources[0])  # after Ctrl-C: out at once
    line = translation_scores(G, sources[0], sizes, judge, "oracle") if judge else ""
    me, out, src = Path(__file__).name, last.parent, short_path(sources[0].test.files[0])
    print_summary(me, step, start, time.time() - t0, [
        ("samples", sorted(out.glob("sample_*.jpg"))[-1:]), ("loss curves", [out / "losses.png"]),
        ("checkpoint", [last, out / "log.jsonl"])], line and f"target label read in: {line}", [
        (f"python {me} sample --out {out} --src {src}", "one image to every target"),
        (f"python {me} eval --out {out}" + ("" if judge else " --train-classifier"),
         "the oracle's scores" if judge else "scores by a ResNet-18 trained on the real images"),
        (f"python {me} --out {out} --resume auto --total-iters {2 * cfg.total_iters}",
         "train on")], stopped)


def bench(cfg, device):
    """FLOPs of n_critic warm-up iterations, then bench_iters timed ones, on random images."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    nets = build_nets(cfg, [len(cfg.attrs)], device)
    (G, D), (opt_g, opt_d) = (nets.G, nets.D), build_optims(nets, cfg).values()
    x = torch.rand(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device) * 2 - 1
    c = (torch.rand(cfg.batch, len(cfg.attrs), device=device) > 0.5).float()
    batch, sync = (x, c, c.flip(0), cfg), lambda: torch.cuda.synchronize(device) if cuda else None
    counter = flop_counter()
    for n, mode in ((cfg.n_critic, counter), (cfg.bench_iters, contextlib.nullcontext())):
        t0 = (sync(), time.perf_counter())[1]
        with mode:  # first n_critic iterations (n_critic D steps, 1 G step): warm-up and FLOPs
            for i in range(n):
                d_step(G, D, opt_d, *batch)
                if (i + 1) % cfg.n_critic == 0:
                    g_step(G, D, opt_g, *batch)
    its, N = cfg.bench_iters / ((sync(), time.perf_counter())[1] - t0), world_size()  # global
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a"
    print(f"bench {device.type} {cfg.img_size}px batch {cfg.batch}"
          f"{f' × {N} processes' if N > 1 else ''}: {sig3(its)} it/s | "
          f"{sig3(its * cfg.batch * N)} images/s | peak memory {mem} | "
          f"{sig3(counter.get_total_flops() / cfg.n_critic * its * N / 1e12)} TFLOP/s")


# ----------------------------------------------------------------------------
# 8. Entry point
# ----------------------------------------------------------------------------
def main(argv=None):
    extra = [(("--src",), dict(default="", help="sample: an image file or a folder")),
             (("--attrs-set",), dict(default="", help="sample: e.g. Blond_Hair=1,Male=0")),
             (("--ckpt",), dict(default="", help="sample/eval: our last.pt or official *-G.ckpt")),
             (("--train-classifier",), dict(action="store_true", help="eval: train ResNet-18"))]
    cfg, ns = parse_config(Config, PRESETS, argv, __doc__, ("train", "sample", "eval"), extra)
    check_flags(cfg, positive="batch g_lr d_lr n_critic total_iters decay_iters log_every "
                "sample_every save_every", nonneg="num_workers save_minutes", unit="beta1 beta2")
    if cfg.bench or ns.mode == "train":  # under torchrun: this process's GPU (or the CPU)
        device = init_distributed(cfg.device)
        return bench(cfg, device) if cfg.bench else train(cfg, device, ns.given)
    device = pick_device(cfg.device)
    (sample_own if ns.mode == "sample" else evaluate)(*trained_nets(cfg, ns, device), ns, device)


if __name__ == "__main__":
    main_guard(main)

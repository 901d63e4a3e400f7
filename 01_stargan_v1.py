"""StarGAN: Unified Generative Adversarial Networks for Multi-Domain Image-to-Image Translation
(Choi et al., CVPR 2018, arXiv:1711.09020v3). Read beside §3 (Eqs. 1-8), §3.2 (mask vector), §4.

Symbols: x → x_real, c → c_trg, c' → c_org, G(x, c) → x_fake, G(G(x, c), c') → x_rec, D_src /
D_cls → D's two outputs, m → mask vector. Shapes: B batch, H = W size, A labels, R repeat_num.

  python 01_stargan_v1.py --out runs/toy                   # toy CelebA-like faces (CPU)
  python 01_stargan_v1.py --data data/celeba --out runs/celeba          # the paper's CelebA 128 px
  python 01_stargan_v1.py --data toy --data2 toy --out runs/joint       # mask vector: faces+shapes
  python 01_stargan_v1.py --out runs/toy --resume auto      # resume: nets, optimizers, step, RNG
  python 01_stargan_v1.py sample --out runs/toy --src face.jpg --attrs-set Blond_Hair=1,Male=0
  python 01_stargan_v1.py sample --ckpt stargan_celeba_128/models/200000-G.ckpt --src img.jpg
  python 01_stargan_v1.py eval --out runs/toy --train-classifier       # ResNet-18 + oracle scores
  python 01_stargan_v1.py --bench                                       # one line: it/s, TFLOP/s

Measured, default toy run (2000 it, 2-core CPU shared with ~10 other jobs, 1 thread): 1117 s; the
oracle reads the target in Black/Blond/Brown_Hair 89.0/99.5/91.5 %, Male 87.0 %, Young 73.0 % of
translations (misses are mostly noisy, unreadable images). GPU: not measured yet.
Params (128 px, A = 5): G 8,430,528, D 44,762,048 (= official).
Deviations: IN keeps no running statistics (official tracks but never uses them); the lr decays
linearly to 0, every step, over the last 100k iterations as in the paper (official: -0.1 %);
the toy preset uses 4x the paper's lr to learn in CPU minutes.
"""
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.flop_counter import FlopCounterMode

from common import (FACE_ATTRS, CelebAAttrs, DomainFolder, Logger, check_finite, infinite,
                    load_checkpoint, load_rgb, main_guard, make_loader, parse_config, pick_device,
                    prepare_run, read_faces, require, resolve_data, save_checkpoint, save_grid,
                    seed_everything, to_tensor_norm, autocast)

# ----------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------
HAIR = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")  # exclusive when sampling (§4)


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
    batch: int = 16  # batch size (§4)
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
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = False  # channels_last memory format (CUDA speed)
    num_workers: int = 0  # data loader workers
    log_every: int = 100  # iterations between log lines
    sample_every: int = 1000  # iterations between sample grids
    save_every: int = 10000  # iterations between checkpoints
    bench: bool = False  # time training iterations on random data instead of training
    bench_iters: int = 20  # timed iterations for --bench
    cls_iters: int = 2000  # iterations of the ResNet-18 evaluation classifier (eval)


# Toy: CPU minutes. Narrower nets and 4x the paper's lr (learns in ~400 G updates instead of
# thousands); everything else (n_critic, λs, batch, Adam betas, schedule shape) as in the paper.
PRESETS = {"toy": dict(img_size=32, g_conv_dim=16, d_conv_dim=16, g_repeat_num=2, d_repeat_num=4,
                       g_lr=4e-4, d_lr=4e-4, total_iters=2000, decay_iters=1000, log_every=100,
                       sample_every=500, save_every=500, cls_iters=300)}


# ----------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------
def instance_norm(dim):  # Deviation: official IN also tracks running statistics, never used
    return nn.InstanceNorm2d(dim, affine=True)  # (no eval() call there); here eval() == train()


class ResidualBlock(nn.Module):
    """x + [Conv3 → IN → ReLU → Conv3 → IN]; no activation after the sum (official)."""

    def __init__(self, dim):
        super().__init__()
        conv, norm = [nn.Conv2d(dim, dim, 3, 1, 1, bias=False) for _ in "12"], instance_norm
        self.main = nn.Sequential(conv[0], norm(dim), nn.ReLU(True), conv[1], norm(dim))

    def forward(self, x):
        return x + self.main(x)  # (B, C, H, W)


class Generator(nn.Module):
    """G(x, c): encoder (2 downsamplings) → R residual blocks → decoder (2 upsamplings) → tanh.
    Layer indices in self.main equal the official ones, so official state_dicts load as they are."""

    def __init__(self, conv_dim=64, c_dim=5, repeat_num=6):
        super().__init__()
        d = conv_dim
        layers = [nn.Conv2d(3 + c_dim, d, 7, 1, 3, bias=False), instance_norm(d), nn.ReLU(True)]
        for _ in range(2):  # H → H/4, width ×4
            layers += [nn.Conv2d(d, 2 * d, 4, 2, 1, bias=False), instance_norm(2 * d), nn.ReLU(1)]
            d *= 2
        layers += [ResidualBlock(d) for _ in range(repeat_num)]  # (B, 4·conv_dim, H/4, W/4)
        for _ in range(2):  # H/4 → H
            layers += [nn.ConvTranspose2d(d, d // 2, 4, 2, 1, bias=False), instance_norm(d // 2),
                       nn.ReLU(True)]
            d //= 2
        layers += [nn.Conv2d(d, 3, 7, 1, 3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

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
            layers += [nn.Conv2d(d, d * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            d *= 2
        self.main = nn.Sequential(*layers)
        k = image_size // 2 ** repeat_num
        self.conv1 = nn.Conv2d(d, 1, 3, 1, 1, bias=False)  # D_src: one score per patch
        self.conv2 = nn.Conv2d(d, c_dim, k, bias=False)  # D_cls: kernel covers the whole map

    def forward(self, x):
        """x (B, 3, H, W) -> D_src (B, 1, H/2^R, W/2^R) critic scores, D_cls (B, c_dim) logits."""
        h = self.main(x)  # (B, conv_dim·2^(R-1), H/2^R, W/2^R)
        return self.conv1(h), self.conv2(h).flatten(1)  # (B, 1, H/2^R, W/2^R), (B, c_dim)


def load_official(path, net):
    """Load an official yunjey/stargan *-G.ckpt / *-D.ckpt state_dict into our G or D.
    The IN running statistics (running_mean/var, num_batches_tracked) are dropped: never used."""
    state, stats = torch.load(path, "cpu", weights_only=True), ("running_mean", "running_var")
    net.load_state_dict({k: v for k, v in state.items() if not k.endswith(stats + ("_tracked",))})
    return net


# ----------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------
def adv_loss_d(src_real, src_fake):
    """Eq. (8), D side without GP: −E[D_src(x)] + E[D_src(G(x, c))] (D maximises L_adv)."""
    return -src_real.mean() + src_fake.mean()


def adv_loss_g(src_fake):
    """Eq. (8), the term that depends on G: L_adv = −E[D_src(G(x, c))] (G minimises L_adv)."""
    return -src_fake.mean()


def gradient_penalty(D, x_real, x_fake):
    """Eq. (8): E[(‖∇_x̂ D_src(x̂)‖₂ − 1)²], x̂ uniformly on lines between real and fake samples."""
    alpha = torch.rand(x_real.size(0), 1, 1, 1, device=x_real.device)  # (B, 1, 1, 1)
    x_hat = (alpha * x_real + (1 - alpha) * x_fake.detach()).requires_grad_(True)
    src = D(x_hat.view_as(x_hat))[0]  # a non-leaf input: FlopCounterMode (--bench) needs it
    grad = torch.autograd.grad(src.float().sum(), x_hat, create_graph=True)[0]  # (B, 3, H, W)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def cls_loss(logits, c, multi_label):
    """Eqs. (2)-(3): domain classification −log D_cls(c|x). Multi-label (CelebA): BCE summed over
    attributes, mean over the batch (official size_average=False / N); one-hot domains: CE."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), c, reduction="sum") / len(c)
    return F.cross_entropy(logits.float(), c.argmax(1))


def rec_loss(x_real, x_rec):
    """Eq. (4): L_rec = E[‖x − G(G(x, c), c')‖₁] (mean absolute error, as official)."""
    return (x_real - x_rec).abs().mean()


def lr_at(step, lr0, cfg):
    """Constant lr0, then linear decay to 0 over the last decay_iters iterations (§4); a pure
    function of the step so resume is exact. Deviation: official code only decays by 0.1 %."""
    return lr0 * min(1.0, max(0.0, (cfg.total_iters - step) / cfg.decay_iters))


def mask_label(c, k, sizes):
    """§3.2: c̃ = [c_1, .., c_n, m]: dataset k's labels, zeros for the unknown datasets' labels,
    m = one-hot(k). With one dataset the label is c itself (no mask vector)."""
    if len(sizes) == 1:
        return c
    B, parts = c.size(0), [c if i == k else c.new_zeros(c.size(0), n) for i, n in enumerate(sizes)]
    m = F.one_hot(torch.full((B,), k, device=c.device), len(sizes)).to(c.dtype)  # (B, n_sets)
    return torch.cat(parts + [m], dim=1)  # (B, sum(sizes) + n_sets)


def known_logits(logits, k, sizes):
    """§3.2: D classifies only the labels of the dataset the batch came from."""
    return logits[:, sum(sizes[:k]):sum(sizes[:k + 1])]  # (B, sizes[k])


# ----------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------
# A dataset: label names, multi-label (CelebA) or one-hot domains, splits, "faces" if toy faces.
Source = namedtuple("Source", "names multi train test toy")


def image_transform(img_size, train):
    """Official: (CelebA: centre crop 178, done by the reader) → resize → random flip → [-1, 1]."""
    flip = [T.RandomHorizontalFlip()] if train else []
    return T.Compose([T.Resize((img_size, img_size))] + flip + [to_tensor_norm()])


def make_sources(cfg):
    """--data (toy: faces) and, for joint training with the mask vector, --data2 (toy: shapes).
    CelebA layout (list_attr_celeba.txt) -> multi-label attributes, else one-hot domain folders."""
    sources = []
    for data, kind in ((cfg.data, "faces"), (cfg.data2, "shapes"))[:1 + bool(cfg.data2)]:
        root, toy = resolve_data(data, kind, cfg.img_size), kind if data in ("", "toy") else ""
        tf = {s: image_transform(cfg.img_size, s == "train") for s in ("train", "test", "val")}
        if (root / "list_attr_celeba.txt").exists():
            sets = [CelebAAttrs(root, list(cfg.attrs), s, tf[s]) for s in ("train", "test")]
        else:
            splits = ("train", "val" if (root / "val").is_dir() else "test")
            sets = [DomainFolder(root, s, tf[s]) for s in splits]
        names = sets[0].attr_names if hasattr(sets[0], "attr_names") else sets[0].domains
        sources.append(Source(list(names), hasattr(sets[0], "attr_names"), *sets, toy))
    return sources


def as_label(y, multi, n):  # CelebA: float attribute vectors; domain folders: index -> one-hot
    return y.float() if multi else F.one_hot(y, n).float()


# ----------------------------------------------------------------------------
# 5. Steps
# ----------------------------------------------------------------------------
def d_step(G, D, opt_d, x_real, c_org, c_trg, cfg, k=0, sizes=None, multi=True):
    """Eq. (5) with Eq. (8): L_D = −L_adv + λ_cls·L_cls^r. Updates D only (G runs without grad)."""
    sizes = sizes or [c_org.size(1)]
    with autocast(x_real.device, cfg.amp):
        with torch.no_grad():
            x_fake = G(x_real, mask_label(c_trg, k, sizes))  # (B, 3, H, W)
        src_real, cls_real = D(x_real)  # (B, 1, h, w), (B, sum(sizes))
        src_fake, _ = D(x_fake)
        loss_adv = adv_loss_d(src_real.float(), src_fake.float())  # = −L_adv without the GP term
        loss_cls = cls_loss(known_logits(cls_real, k, sizes), c_org, multi)  # Eq. (2), real x
        loss_gp = gradient_penalty(D, x_real, x_fake)
    loss = loss_adv + cfg.lambda_gp * loss_gp + cfg.lambda_cls * loss_cls  # −L_adv + λ_cls L_cls^r
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return {"D/adv": loss_adv.detach(), "D/gp": loss_gp.detach(), "D/cls": loss_cls.detach()}


def g_step(G, D, opt_g, x_real, c_org, c_trg, cfg, k=0, sizes=None, multi=True):
    """Eq. (6): L_G = L_adv + λ_cls·L_cls^f + λ_rec·L_rec. Updates G only: D is frozen here."""
    sizes = sizes or [c_org.size(1)]
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
    opt_g.step()
    D.requires_grad_(True)
    return {"G/adv": loss_adv.detach(), "G/cls": loss_cls.detach(), "G/rec": loss_rec.detach()}


def build(cfg, sizes, device):
    """G sees [c_1, .., c_n, m] (the mask only with n > 1 datasets); D classifies c_1..c_n."""
    n = len(sizes)
    G = Generator(cfg.g_conv_dim, sum(sizes) + (n if n > 1 else 0), cfg.g_repeat_num).to(device)
    D = Discriminator(cfg.img_size, cfg.d_conv_dim, sum(sizes), cfg.d_repeat_num).to(device)
    if cfg.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    fast, betas = {"fused" if device.type == "cuda" else "foreach": True}, (cfg.beta1, cfg.beta2)
    return G, D, *(torch.optim.Adam(net.parameters(), lr, betas, **fast)
                   for net, lr in ((G, cfg.g_lr), (D, cfg.d_lr)))


# ----------------------------------------------------------------------------
# 6. Sampling
# ----------------------------------------------------------------------------
def target_labels(c_org, names, multi):
    """Official create_labels: one target per label; hair colours exclusive, other attributes
    flipped; one-hot domains: every domain."""
    B, A = c_org.shape
    if not multi:
        return [F.one_hot(torch.full((B,), j, device=c_org.device), A).float() for j in range(A)]
    hair, targets = [j for j, a in enumerate(names) if a in HAIR], [c_org.clone() for _ in names]
    for j, c in enumerate(targets):
        c[:, hair if j in hair else []] = 0
        c[:, j] = 1 if j in hair else 1 - c_org[:, j]
    return targets


def all_targets(c_org, k, sources, sizes):
    """Masked labels for the columns of a grid: every target of every dataset (the others' labels
    through the mask vector, §3.2), then one multi-attribute target (hair + all others flipped)."""
    labels = []
    for j, s in enumerate(sources):
        c0 = c_org if j == k else c_org.new_zeros(len(c_org), sizes[j])
        labels += [mask_label(c, j, sizes) for c in target_labels(c0, s.names, s.multi)]
    names = sources[k].names
    if sources[k].multi and len(names) > 1:
        hair, other = ([j for j, a in enumerate(names) if (a in HAIR) == h] for h in (1, 0))
        c = target_labels(c_org, names, True)[hair[0]] if hair else c_org.clone()
        c[:, other] = 1 - c_org[:, other]
        labels.append(mask_label(c, k, sizes))
    return labels


@torch.no_grad()
def save_translations(G, x_real, labels, path):
    """Rows: images; columns: input, then G(x, c̃) for each masked label c̃ in `labels`."""
    cols = [x_real] + [G(x_real, c).float() for c in labels]
    save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=len(cols))  # (B·cols, 3, H, W)


def oracle_judge(src):
    """Toy faces: the oracle reads labels back from pixels -> (pred (B, A) {0,1}, valid (B,))."""
    if src.toy != "faces" or not set(src.names) <= set(FACE_ATTRS):
        return None
    cols = [FACE_ATTRS.index(a) for a in src.names]
    return lambda x: (lambda r: (r["attrs"][:, cols], r["valid"]))(read_faces(x))


@torch.no_grad()
def translation_scores(G, src, sizes, judge):
    """Test split. `real`: judge's accuracy on real images; per label j: the share of translations
    to target j that judge reads as label j; `all`: translations matching the whole target;
    `valid`: translations judge can read. judge(x) -> (pred (B, A) {0,1}, valid (B,)); invalid
    images count as failures."""
    A, device = len(src.names), next(G.parameters()).device
    hit, real, every, n, n_valid = torch.zeros(A), torch.zeros(A), 0, 0, 0
    for x, y in make_loader(src.test, 50, shuffle=False):
        x, c_org = x.to(device), as_label(y, src.multi, A).to(device)
        pred, valid = judge(x)
        real += ((pred == c_org.cpu()) & valid[:, None]).sum(0)
        for j, c in enumerate(target_labels(c_org, src.names, src.multi)):
            pred, valid = judge(G(x, mask_label(c, 0, sizes)).float())
            ok = (pred == c.cpu()) & valid[:, None]  # (B, A)
            hit[j], every, n = hit[j] + ok[:, j].sum(), every + ok.all(1).sum().item(), n + len(x)
            n_valid += valid.sum().item()
    per_label = {a: hit[j].item() * A / n for j, a in enumerate(src.names)}
    return {"real": real.sum().item() / n, **per_label, "all": every / n, "valid": n_valid / n}


def classifier(src, cfg, device, path, train):
    """§4.5's protocol: a ResNet-18 from scratch on real images (trained now, or loaded)."""
    net = torchvision.models.resnet18(weights=None, num_classes=len(src.names)).to(device)
    if not train:
        require(path.is_file(), f"{path} missing: run `eval --train-classifier` first")
        net.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    opt, stream = torch.optim.Adam(net.parameters(), 1e-3), infinite(make_loader(src.train, 32))
    for _ in range(cfg.cls_iters if train else 0):
        x, y = next(stream)
        loss = cls_loss(net(x.to(device)), as_label(y, src.multi, len(src.names)).to(device),
                        src.multi)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if train:
        torch.save(net.state_dict(), path)
    read = lambda z: (z > 0) if src.multi else F.one_hot(z.argmax(1), z.size(1))  # noqa: E731
    return lambda x: (read(net.eval()(x)).float().cpu(), torch.ones(len(x), dtype=torch.bool))


def load_trained(path, cfg, device):
    """Our last.pt (its config and label layout inside) or an official *-G.ckpt (+ *-D.ckpt)."""
    require(Path(path).is_file(), f"checkpoint {path} not found: train first, or pass --ckpt FILE")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "nets" not in state:  # official: CelebA attributes from --attrs, D from the sibling file
        G, D, _, _ = build(cfg, [len(cfg.attrs)], device)
        d_path = Path(str(path).replace("-G.ckpt", "-D.ckpt"))
        D = load_official(d_path, D) if d_path != Path(path) and d_path.is_file() else None
        return cfg, load_official(path, G), D, [Source(list(cfg.attrs), True, None, None, "")]
    cfg = Config(**{**state["config"], "out": cfg.out})
    G, D, _, _ = build(cfg, [len(n) for n in state["extra"]["names"]], device)
    G.load_state_dict(state["nets"]["G"]), D.load_state_dict(state["nets"]["D"])
    toys = ["faces" if cfg.data in ("", "toy") else "", "shapes" if cfg.data2 == "toy" else ""]
    return cfg, G, D, [Source(n, m, None, None, t) for n, m, t in
                       zip(state["extra"]["names"], state["extra"]["multi"], toys)]


@torch.no_grad()
def sample_own(cfg, ns, device):
    """Own images (file or folder) → every target label, or the one given by --attrs-set."""
    cfg, G, D, sources = load_trained(ns.ckpt or Path(cfg.out) / "last.pt", cfg, device)
    src, sizes, (names, multi) = Path(ns.src), [len(s.names) for s in sources], sources[0][:2]
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) \
        if src.is_dir() else [src]
    require(ns.src and files and files[0].is_file(), f"--src '{ns.src}': no .jpg/.png image")
    square = T.Lambda(lambda im: T.functional.center_crop(im, min(im.size)))  # 178 on CelebA
    tf = T.Compose([square, image_transform(cfg.img_size, False)])
    x_real = torch.stack([tf(load_rgb(f)) for f in files]).to(device)  # (B, 3, H, W)
    # The original labels are unknown: D's classifier estimates them (all 0 without a D).
    logits = known_logits(D(x_real)[1], 0, sizes) if D else x_real.new_full((len(files), 1), -1.)
    c_org = (logits > 0).float() if multi else F.one_hot(logits.argmax(1), sizes[0]).float()
    labels, c = all_targets(c_org, 0, sources, sizes), c_org.clone()
    for item in filter(None, ns.attrs_set.split(",")):
        name, _, value = item.partition("=")
        require(name in names and value in ("0", "1"),
                f"--attrs-set {item}: use NAME=0 or NAME=1 with NAME in {' '.join(names)}")
        exclusive = [j for j, a in enumerate(names) if not multi or a in HAIR and name in HAIR]
        c[:, exclusive if value == "1" else []] = 0
        c[:, names.index(name)], labels = float(value), [mask_label(c, 0, sizes)]
    save_translations(G, x_real, labels, Path(cfg.out) / "sample_own.jpg")
    print(f"wrote {Path(cfg.out) / 'sample_own.jpg'}: {len(files)} images x {len(labels)} targets")


def evaluate(cfg, ns, device):
    """Classifier accuracy on real test images and on translations (§4.5); toy: also the oracle."""
    cfg, G, _, sources = load_trained(ns.ckpt or Path(cfg.out) / "last.pt", cfg, device)
    sizes, path = [len(s.names) for s in sources], Path(cfg.out) / "classifier.pt"
    src = make_sources(cfg)[0]
    judges = {"oracle": oracle_judge(src)} if oracle_judge(src) else {}
    if ns.train_classifier or path.is_file() or not judges:
        judges["ResNet-18"] = classifier(src, cfg, device, path, ns.train_classifier)
    for title, judge in judges.items():
        report(title, translation_scores(G, src, sizes, judge))


def report(title, scores):
    print(f"{title}: " + " | ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))


# ----------------------------------------------------------------------------
# 7. Train
# ----------------------------------------------------------------------------
def train(cfg, device):
    """n_critic D steps per G step (§4); with two datasets each iteration visits both (§3.2)."""
    seed_everything(cfg.seed)
    ckpt, last = prepare_run(cfg.out, cfg.resume, cfg.overwrite), Path(cfg.out) / "last.pt"
    sources = make_sources(cfg)
    G, D, opt_g, opt_d = build(cfg, sizes := [len(s.names) for s in sources], device)
    nets, opts = {"G": G, "D": D}, {"G": opt_g, "D": opt_d}
    step = load_checkpoint(ckpt, nets, opts)["step"] if ckpt else 0
    extra = {"names": [s.names for s in sources], "multi": [s.multi for s in sources]}
    streams = [infinite(make_loader(s.train, cfg.batch, num_workers=cfg.num_workers,
                                    device=device, seed=cfg.seed + step)) for s in sources]
    x_fix, y_fix = next(iter(make_loader(sources[0].test, 8, shuffle=False)))
    x_fix, c_fix = x_fix.to(device), as_label(y_fix, sources[0].multi, sizes[0]).to(device)
    logger, t0 = Logger(cfg.out, cfg.total_iters, cfg.log_every), time.time()
    try:
        while step < cfg.total_iters:
            for opt, lr0 in ((opt_g, cfg.g_lr), (opt_d, cfg.d_lr)):  # one param group each
                opt.param_groups[0]["lr"] = lr_at(step, lr0, cfg)
            losses = {}
            for k, (s, stream) in enumerate(zip(sources, streams)):  # alternate datasets, §3.2
                x_real, y = next(stream)
                x_real, c_org = x_real.to(device), as_label(y.to(device), s.multi, sizes[k])
                c_trg = c_org[torch.randperm(len(c_org), device=device)]  # official: shuffled
                batch, tag = (x_real, c_org, c_trg, cfg, k, sizes, s.multi), str(k + 1)[:k]
                losses.update({n + tag: v for n, v in d_step(G, D, opt_d, *batch).items()})
                if (step + 1) % cfg.n_critic == 0:
                    losses.update({n + tag: v for n, v in g_step(G, D, opt_g, *batch).items()})
            step += 1
            if step % cfg.log_every == 0:
                logger.log(step, losses)
            if step % cfg.sample_every == 0 or step == cfg.total_iters:
                labels = all_targets(c_fix, 0, sources, sizes)
                save_translations(G, x_fix, labels, Path(cfg.out) / f"sample_{step:06d}.jpg")
            if step % cfg.save_every == 0 or step == cfg.total_iters:
                check_finite(losses, step, last if last.exists() else None)
                save_checkpoint(last, step, cfg, nets, opts, extra)
    except KeyboardInterrupt:  # a D step may be half done; its update is kept, the step not
        save_checkpoint(last, step, cfg, nets, opts, extra)
        print(f"interrupted at step {step}; saved {last} (continue with --resume auto)")
        return G
    print(f"trained {cfg.total_iters} iterations in {time.time() - t0:.0f} s; {last}")
    if oracle_judge(sources[0]):
        report("oracle", translation_scores(G, sources[0], sizes, oracle_judge(sources[0])))
    return G


def bench(cfg, device):
    """n_critic warm-up iterations, then bench_iters timed ones on random data (no dataset)."""
    seed_everything(cfg.seed)
    G, D, opt_g, opt_d = build(cfg, [len(cfg.attrs)], device)
    x = torch.rand(cfg.batch, 3, cfg.img_size, cfg.img_size, device=device) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
    c = (torch.rand(cfg.batch, len(cfg.attrs), device=device) > 0.5).float()
    sync, flops = torch.cuda.synchronize if device.type == "cuda" else (lambda: None), []
    for i in range(cfg.n_critic + cfg.bench_iters):
        t0 = (sync(), time.perf_counter())[1] if i == cfg.n_critic else t0 if i else 0.0
        d_step(G, D, opt_d, x, c, c.flip(0), cfg)
        if (i + 1) % cfg.n_critic == 0:
            g_step(G, D, opt_g, x, c, c.flip(0), cfg)
    its = cfg.bench_iters / ((sync(), time.perf_counter())[1] - t0)
    for fn, opt in ((d_step, opt_d), (g_step, opt_g)):  # FLOPs per iteration: D + G / n_critic
        with FlopCounterMode(display=False) as counter:
            fn(G, D, opt, x, c, c.flip(0), cfg)
        flops.append(counter.get_total_flops() / (1 if fn is d_step else cfg.n_critic))
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    print(f"bench {device.type} {cfg.img_size}px batch {cfg.batch}: {its:.2f} it/s | "
          f"{its * cfg.batch:.1f} images/s | peak memory {mem} | "
          f"{sum(flops) * its / 1e12:.4f} TFLOP/s")


# ----------------------------------------------------------------------------
# 8. Entry point
# ----------------------------------------------------------------------------
EXTRA = [(("--" + name,), dict(default="", help=text)) for name, text in (
    ("src", "sample: an image file or a folder of images"),
    ("attrs-set", "sample: target labels, e.g. Blond_Hair=1,Male=0"),
    ("ckpt", "sample/eval: our last.pt or an official *-G.ckpt"))] + [
    (("--train-classifier",), dict(action="store_true", help="eval: train the ResNet-18 first"))]


def main(argv=None):
    cfg, ns = parse_config(Config, PRESETS, argv, doc=__doc__, modes=("train", "sample", "eval"),
                           extra=EXTRA)
    device = pick_device(cfg.device)
    if cfg.bench:
        return bench(cfg, device)
    if ns.mode == "train":
        return train(cfg, device)
    return (sample_own if ns.mode == "sample" else evaluate)(cfg, ns, device)


if __name__ == "__main__":
    main_guard(main)

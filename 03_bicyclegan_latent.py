"""BicycleGAN: "Toward Multimodal Image-to-Image Translation" (Zhu et al., NeurIPS 2017,
arXiv:1711.11586v4). Read beside §3: cVAE-GAN, cLR-GAN, the hybrid objective Eq. (9), details.
Official code: junyanz/BicycleGAN. Symbols: A, B -> A (edges, toy: silhouette), B (photo); G, E; the
cVAE-GAN / cLR-GAN discriminators -> D / D2; E(B) = (mu, log sigma^2) -> mu, logvar; z ~ E(B) ->
z_enc; z ~ N(0, I) -> z_rand; B_hat = G(A, z_enc) -> x_enc; G(A, z_rand) -> x_rand;
z_hat = E(G(A, z_rand)) -> mu2. Shapes: B batch, C channels, H = W = img_size, nz = 8.

Run:      python 03_bicyclegan_latent.py      (toy shapes, 2-core CPU; resume: --resume auto)
Paired:   python 03_bicyclegan_latent.py --data data/edges2shoes     (pix2pix A|B files)
Photos:   python 03_bicyclegan_latent.py --data data/afhq    (A = edge map of B, made on the fly)
Sample:   python 03_bicyclegan_latent.py sample|eval  (grid + z GIF | LPIPS diversity, L1, oracle)
Bench:    python 03_bicyclegan_latent.py --bench --preset edges2shoes   (256 px, batch 2)
GPUs:     torchrun --nproc_per_node 8 03_bicyclegan_latent.py --data data/edges2shoes  # 8 × 2
Builds on: 01's code tiled over the image and concatenated to G's input (here z, not the label c),
and 01's reconstruction cycle, moved from the image (x → x_fake → x_rec) to the latent (z → B̂ → ẑ).
Expected: default toy run (4500 steps, 64 px; seeds 0-3): shape and position follow A (shape kept
0.99-1.00, position error 0.003-0.007, 99.0-99.8 % valid); z picks the colour (std over 20 z
0.237-0.265, real images 0.258: orange to violet); G(A, μ(E(B))) takes B's colour (error
0.068-0.153 against 0.28-0.30 for random z).
Deviations: lr decays per iteration, not per epoch (resume stays exact); the U-Net/encoder depth
follows img_size (the official code has 128 and 256 variants only); flips happen on the batch;
toy only: A is a filled silhouette, lr 1e-3, λ_KL 0.0015 (PRESETS says why).
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset
from torch.func import functional_call
from torchvision import transforms as T


from common import (Logger, SaveTimer, UserError, autocast, average_gradients, check_finite,
                    check_flags, check_same_weights, check_save, flop_counter, init_distributed,
                    is_main, load_checkpoint, load_run, main_guard, mean_over_ranks, next_batch,
                    own_rng, parse_config, pick_device, prepare_run, print_summary, report_crash,
                    require, save_checkpoint, save_gif, save_grid, seed_everything, shard_draw,
                    sig3, start_line, world_size)
from data.datasets import (AlignedPairs, IMAGE_SUFFIXES, ImageFiles, epoch_rows, make_loader,
                           resolve_data)
from data.metrics import LPIPS
from data.toy import BG, read_shapes

# ----------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------
@dataclass
class Config:
    data: str = ""  # "" or "toy" -> toy shapes; a pix2pix A|B folder; or any image folder
    out: str = "runs/03_bicyclegan"  # run folder (last.pt, samples, log.jsonl)
    resume: str = ""  # "" (fresh), "auto" (out/last.pt if any) or a checkpoint path
    overwrite: bool = False  # allow starting fresh over an existing out/last.pt
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # seeds python + torch; also fixes the data order per epoch
    img_size: int = 256  # load_size = crop_size = 256 (train_edges2shoes.sh)
    input_nc: int = 1  # channels of A (edges, grayscale)
    output_nc: int = 3  # channels of B
    nz: int = 8  # |z|, latent code size
    ngf: int = 64  # G base width
    nef: int = 64  # E base width
    ndf: int = 64  # D base width (second scale uses ndf / 2)
    where_add: str = "all"  # z concatenated to every down-conv ("all") or only the input
    dropout: bool = True  # Dropout(0.5) in the inner up blocks (--use_dropout)
    flip: bool = True  # paired horizontal flips (the official script never passes --no_flip)
    batch: int = 2  # per process (global: N processes × batch); half cVAE-GAN, half cLR-GAN; even
    lr: float = 2e-4  # Adam lr for G, E, D, D2
    lambda_l1: float = 10.0  # lambda, weight of L1^VAE in Eq. (9)
    lambda_kl: float = 0.01  # lambda_KL, weight of L_KL in Eq. (9)
    lambda_z: float = 0.5  # lambda_latent, weight of L1^latent in Eq. (9)
    total_iters: int = 1_494_720  # 60 epochs of edges2shoes (49,825 pairs / 2); decay in 2nd half
    log_every: int = 100  # print + log.jsonl every N steps
    sample_every: int = 5000  # sample grid every N steps
    save_every: int = 5000  # checkpoint every N steps
    save_minutes: float = 30.0  # and every N minutes of wall time (0: by steps only)
    num_workers: int = 4  # data loader workers (official: 4 threads)
    amp: bool | None = None  # bf16 autocast: default CUDA only; --amp on the CPU too
    bench: bool = False  # time training on synthetic data instead of training
    bench_iters: int = 20  # timed iterations for --bench (after 3 warm-up ones)
    compile: bool = False  # torch.compile G, E, D, D2 (no double backward here)


PRESETS = {  # edges2shoes = the defaults; afhq: 60 epochs of 14,630 images / 2
    "edges2shoes": {}, "afhq": dict(total_iters=438_900),
    # Deviation (toy only): 64 px (the smallest size both PatchGAN scales take), narrow nets and
    # batch 8 instead of 2; 4500 steps: at 3000, one seed of four (1 thread) had not yet learnt
    # orange and blue codes (colour std over z 0.181), at 4500 it gave 0.237. Its A is the
    # object's filled silhouette (to_pair).
    # lr 1e-3 (5x): at 2e-4 and 6e-4, G learnt to ignore z before E learnt to encode B's colour
    # on some seeds (posterior collapse: every output one colour). Likely why: the official init
    # (gain 0.02) starts the IN-free paths that carry a colour's magnitude (E's shortcuts, G's
    # outer skip) near zero; at 1e-3 E encodes colour within ~1000 steps.
    # λ_KL 0.0015: the KL is summed over the 4 encoded samples of a step (official: 1) while L1
    # is a mean, so 0.01 / 4 = 0.0025 would weigh it as the official code does; at 0.0025 E
    # dropped a colour direction on one seed (z never gave blue), at 0.001 random z fell
    # outside the codes E gives and tinted the background.
    "toy": dict(img_size=64, ngf=16, nef=8, ndf=8, batch=8, lr=1e-3, lambda_kl=0.0015,
                total_iters=4500, log_every=100, sample_every=500, save_every=500, num_workers=0),
}
# Resume, sample and eval refuse a change of these (the weights would not fit); any other given
# flag is applied (common.run_config).
FIXED = ("data", "img_size", "input_nc", "output_nc", "nz", "ngf", "nef", "ndf", "where_add")

# ----------------------------------------------------------------------------
# 2. Networks
# ----------------------------------------------------------------------------
class UnetBlock(nn.Module):
    """U-Net level: [LReLU] Conv4s2 [IN] -> inner levels -> ReLU ConvT4s2 [IN | Tanh] [Dropout]."""
    def __init__(self, in_nc, outer_nc, inner_nc, nz, inner=None, outermost=False, dropout=False):
        super().__init__()
        self.nz, self.inner, self.outermost, self.outer_nc = nz, inner, outermost, outer_nc
        innermost = inner is None  # its down-conv output is 1x1: no norm
        down = [nn.Conv2d(in_nc + nz, inner_nc, 4, 2, 1)]
        if not outermost:
            down = [nn.LeakyReLU(0.2)] + down + ([] if innermost else [nn.InstanceNorm2d(inner_nc)])
        up_in = inner_nc if innermost else inner_nc * 2  # inner levels return cat(up, skip)
        up = [nn.ReLU(), nn.ConvTranspose2d(up_in, outer_nc, 4, 2, 1)]
        up += [nn.Tanh()] if outermost else [nn.InstanceNorm2d(outer_nc)]
        self.down, self.up = nn.Sequential(*down), nn.Sequential(*up)
        self.dropout = Dropout(0.5) if dropout else None  # after `up`, as official's last layer

    def forward(self, x, z, masks=None):
        """x (B, C, H, W), z (B, nz) tiled if nz > 0, masks: an iterator over the Dropout keep
        masks, innermost first (None: drawn here) -> (B, outer_nc [+ C], H, W)"""
        B, C, H, W = x.shape
        xz = torch.cat([x, z[:, :, None, None].expand(-1, -1, H, W)], 1) if self.nz else x
        h = self.down(xz)  # (B, inner_nc, H/2, W/2); xz is (B, C + nz, H, W)
        if self.inner is not None:
            h = self.inner(h, z, masks)  # (B, 2*inner_nc, H/2, W/2)
        h = self.up(h)  # (B, outer_nc, H, W)
        if self.dropout is not None:
            h = self.dropout(h, None if masks is None else next(masks))
        if self.outermost:
            return h
        # Official quirk: without z the in-place LeakyReLU of `down` also rewrites x, so in the
        # input-only U-Net the skip carries LReLU(x); with z it acts on the cat copy instead.
        skip = x if self.nz else F.leaky_relu(x, 0.2)
        return torch.cat([h, skip], 1)  # (B, outer_nc + C, H, W)


class Dropout(nn.Dropout):
    """nn.Dropout whose keep mask (0/1, x's shape) may come from the caller: the training step
    draws every mask of a G pass in one place (Generator.dropout_masks), so that under torchrun
    each process can keep its rows of the global batch's draw. The same arithmetic at any N, on
    any device (F.dropout is a fused kernel with its own RNG use on CUDA)."""
    def forward(self, x, keep=None):
        if not self.training:
            return x
        keep = torch.empty_like(x).bernoulli_(1 - self.p) if keep is None else keep.to(x.dtype)
        return x * (keep / (1 - self.p))  # what F.dropout computes on the CPU


class Generator(nn.Module):
    """G(A, z): U-Net, log2(img_size) levels (256 -> 1 -> 256 px); z tiled onto every down-conv
    input (where_add="all", official G_Unet_add_all) or onto A only ("input", G_Unet_add_input)."""
    def __init__(self, input_nc=1, output_nc=3, nz=8, ngf=64, img_size=256, where_add="all",
                 dropout=True):
        super().__init__()
        block = None
        for i in reversed(range(int(math.log2(img_size)))):  # innermost (1x1) first
            inner_nc = ngf * min(2 ** i, 8)
            outer_nc = ngf * min(2 ** (i - 1), 8) if i else output_nc
            drop = dropout and block is not None and outer_nc == ngf * 8  # 3 levels at 256 px
            block = UnetBlock(outer_nc if i else input_nc, outer_nc, inner_nc,
                              nz if where_add == "all" or i == 0 else 0, block, i == 0, drop)
        self.model = block

    def forward(self, A, z, masks=None):
        """A (B, 1, H, W) in [-1, 1], z (B, nz), masks: dropout_masks(B, H, W) or None (drawn
        inside) -> (B, 3, H, W) in [-1, 1]"""
        return self.model(A, z, None if masks is None else iter(masks))

    def dropout_masks(self, batch, H, W, device=None):
        """Keep masks (batch, C, H/2^i, W/2^i), 1 with probability 1 − p, one per Dropout of an
        (H, W) input, in the order forward applies them (innermost first); [] without Dropout."""
        blocks, block, level = [], self.model, 0
        while block is not None:  # outermost (level 0, H × W) to innermost
            blocks += [(block.dropout, (batch, block.outer_nc, H >> level, W >> level))] * bool(
                block.dropout)
            block, level = block.inner, level + 1
        return [torch.empty(shape, device=device).bernoulli_(1 - drop.p)
                for drop, shape in reversed(blocks)]


class ResBlock(nn.Module):
    """E's BasicBlock: IN LReLU Conv3 IN LReLU Conv3 AvgPool2 + shortcut AvgPool2 Conv1."""
    def __init__(self, in_nc, out_nc):
        super().__init__()
        self.conv = nn.Sequential(
            nn.InstanceNorm2d(in_nc), nn.LeakyReLU(0.2), nn.Conv2d(in_nc, in_nc, 3, 1, 1),
            nn.InstanceNorm2d(in_nc), nn.LeakyReLU(0.2), nn.Conv2d(in_nc, out_nc, 3, 1, 1),
            nn.AvgPool2d(2))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_nc, out_nc, 1))

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)  # (B, out_nc, H/2, W/2)


class Encoder(nn.Module):
    """E(B) -> (mu, logvar) of q(z|B): ResNet ending at 8x8 then average pooled (resnet_256)."""
    def __init__(self, input_nc=3, nz=8, nef=64, img_size=256):
        super().__init__()
        n_blocks = int(math.log2(img_size)) - 3  # 5 at 256 px (resnet_256), 4 at 128 (resnet_128)
        blocks = [ResBlock(nef * min(4, n), nef * min(4, n + 1)) for n in range(1, n_blocks)]
        self.conv = nn.Sequential(nn.Conv2d(input_nc, nef, 4, 2, 1), *blocks,  # 64 128 192 256 256
                                  nn.LeakyReLU(0.2), nn.AvgPool2d(8))
        c = nef * min(4, n_blocks)
        self.fc, self.fc_var = nn.Linear(c, nz), nn.Linear(c, nz)  # heads for mu and log sigma^2

    def forward(self, B_img):
        """B_img (B, 3, H, W) in [-1, 1] -> mu (B, nz), logvar (B, nz)"""
        h = self.conv(B_img).flatten(1)  # (B, 4*nef) after 8x8 average pooling
        return self.fc(h), self.fc_var(h)


def patch_layers(in_nc, ndf):
    """One 70x70 PatchGAN (n_layers=3): 256 px -> a 30x30 map of real/fake scores."""
    layers = [nn.Conv2d(in_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    for c_in, c_out, stride in ((ndf, 2 * ndf, 2), (2 * ndf, 4 * ndf, 2), (4 * ndf, 8 * ndf, 1)):
        layers += [nn.Conv2d(c_in, c_out, 4, stride, 1), nn.InstanceNorm2d(c_out),
                   nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers, nn.Conv2d(8 * ndf, 1, 4, 1, 1))


class MultiScaleD(nn.Module):
    """D_NLayersMulti with num_D=2: PatchGAN on x and (with ndf/2) on x downsampled by 2."""
    def __init__(self, input_nc=3, ndf=64):
        super().__init__()
        self.scales = nn.ModuleList([patch_layers(input_nc, ndf), patch_layers(input_nc, ndf // 2)])
        self.down = nn.AvgPool2d(3, 2, 1, count_include_pad=False)

    def forward(self, x):
        """x (B, 3, H, W) -> [(B, 1, 30, 30), (B, 1, 14, 14)] at 256 px (LSGAN scores)."""
        return [self.scales[0](x), self.scales[1](self.down(x))]


# ----------------------------------------------------------------------------
# 3. Losses
# ----------------------------------------------------------------------------
def lsgan_loss(preds, target):
    """LSGAN (Mao et al.): mean (D(x) - target)^2 per scale, summed over the 2 scales."""
    return sum(((p.float() - target) ** 2).mean() for p in preds)


def kl_loss(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - e^logvar), summed over the
    batch and the nz dimensions (official)."""
    return -0.5 * torch.sum(1 + logvar.float() - mu.float() ** 2 - logvar.float().exp())


def l1_loss(x, y):
    """L1^VAE = ||B - G(A, z_enc)||_1 and L1^latent = ||z - E(G(A, z))||_1 (both means)."""
    return (x.float() - y.float()).abs().mean()

# ----------------------------------------------------------------------------
# 4. Data
# ----------------------------------------------------------------------------
def edge_map(x, thresh=0.25):
    """x (B, 3, H, W) in [-1, 1] -> A (B, 1, H, W) in {-1, 1}: dark Sobel edges on white."""
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device)[:, None, None]).sum(1, True)
    kx = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]], device=x.device)
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), torch.stack([kx, kx.t()])[:, None])
    mag = g.square().sum(1, keepdim=True).sqrt()  # (B, 1, H, W) from g (B, 2, H, W)
    mag = mag / mag.amax((2, 3), keepdim=True).clamp_min(1.0)  # flat image -> no edges
    return 1.0 - 2.0 * (mag > thresh).float()  # (B, 1, H, W)


def is_aligned(folder):
    """pix2pix A|B files: the first readable image directly in folder is twice as wide as high."""
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    for f in (f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()):
        try:
            with Image.open(f) as img:  # reads the header only
                return img.width == 2 * img.height
        except Exception:  # unreadable: the reader names and skips it
            continue
    return False


def silhouette(x):
    """Toy A: x (B, 3, H, W) in [-1, 1] -> A (B, 1, H, W) in {-1, 1}: the object, filled dark on
    white (its pixels differ from the toy background by > 0.2, as the oracle reads them).
    Deviation (toy only): a flat object's outline looks the same inside and out to G's first,
    un-normalised layers, the only ones where z's magnitude survives IN, so z could only tint the
    whole image; filled, the first conv can set the object's colour from z (measured: with
    edges, z tinted the background or drew frames, and shape kept was 0.49-0.79)."""
    diff = ((x + 1) / 2 - BG.to(x.device).view(1, 3, 1, 1)).abs().amax(1, keepdim=True)
    return 1.0 - 2.0 * (diff > 0.2).float()  # (B, 1, H, W)


def build_dataset(cfg, split="train"):
    """pix2pix A|B files -> AlignedPairs (A, B); other folders (toy, AFHQ, CelebA) -> B alone."""
    root = resolve_data(cfg.data, "shapes", cfg.img_size)
    folder = root / split if (root / split).is_dir() else root / "train"
    paired = is_aligned(folder)
    if paired:
        def norm(img, nc):  # official: Resize([256, 256], BICUBIC) per half, A grayscale
            img = img.resize((cfg.img_size, cfg.img_size), Image.BICUBIC)
            return T.functional.to_tensor(img.convert("L" if nc == 1 else "RGB")) * 2 - 1
        data = AlignedPairs(root, folder.name, lambda a, b: (norm(a, cfg.input_nc),
                                                             norm(b, cfg.output_nc)))
    else:
        tf = T.Compose([T.Resize(cfg.img_size), T.CenterCrop(cfg.img_size), T.ToTensor(),
                        T.Normalize([0.5] * 3, [0.5] * 3)])
        data = ImageFiles(folder if folder.is_dir() else root, transform=tf)
    if split == "train":  # the choice rests on one file: say which it was
        sketch = "silhouettes" if cfg.data in ("", "toy") else "edge maps"  # as to_pair makes A
        print(f"data: {len(data)} A|B pairs in {folder}" if paired else f"data: {len(data)} "
              f"photos below {data.folders[0]}, A = their {sketch} (not 2:1 A|B pairs)")
    return data


def to_pair(batch, cfg, device, flip=None):
    """Loader batch -> (A, B) on device (A = edge_map(B) if absent); flip: (B,) bool, paired."""
    A, B = batch if isinstance(batch, (list, tuple)) else (None, batch)
    B = B.to(device, non_blocking=True)
    sketch = silhouette if cfg.data in ("", "toy") else edge_map
    A = sketch(B) if A is None else A.to(device, non_blocking=True)
    if flip is not None:
        f = flip.to(device)[:, None, None, None]  # (B, 1, 1, 1)
        A, B = torch.where(f, A.flip(3), A), torch.where(f, B.flip(3), B)
    return A, B


def batch_stream(dataset, cfg, device, step):
    """Endless (A, B) batches from `step` on; order and flips are pure functions of (seed, step),
    and under torchrun each process takes its rows of every global batch (datasets.epoch_rows)."""
    n, b = len(dataset), cfg.batch
    per_epoch, mine = epoch_rows(n, b)
    while True:
        epoch, skip = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        order, flips = torch.randperm(n, generator=g), (torch.rand(n, generator=g) < 0.5) & cfg.flip
        order, flips = order[mine], flips[mine]
        loader = make_loader(Subset(dataset, order[skip * b:].tolist()), b, shuffle=False,
                             num_workers=cfg.num_workers, device=device)
        for i, batch in enumerate(loader, skip):
            yield to_pair(batch, cfg, device, flips[i * b:(i + 1) * b])
            step += 1


def fixed_inputs(cfg, device, n=4):
    """n evenly spaced validation pairs: a fixed debug batch, comparable across steps."""
    dataset = build_dataset(cfg, "val")
    items = [dataset[i] for i in torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long()]
    if isinstance(items[0], tuple):  # aligned (A, B)
        return to_pair([torch.stack(t) for t in zip(*items)], cfg, device)
    return to_pair(torch.stack(items), cfg, device)

# ----------------------------------------------------------------------------
# 5. Steps
# ----------------------------------------------------------------------------
def frozen_call(net, x):
    """net(x) with net's weights detached: the gradient reaches x but never the weights."""
    return functional_call(net, {k: p.detach() for k, p in net.named_parameters()}, (x,))


def forward(nets, A, B, nz):
    """Official `forward`: half 1 -> cVAE-GAN and cLR-GAN outputs (same A); half 2 -> D2's reals."""
    half = A.shape[0] // 2
    A_enc, B_enc, B_rand = A[:half], B[:half], B[half:]  # (B/2, C, H, W) each
    mu, logvar = nets.E(B_enc)  # (B/2, nz) each
    # Under torchrun the noise of each process: its rows of the global batch's draw
    eps = shard_draw(lambda n: torch.randn(n, nz, device=A.device, dtype=mu.dtype), half)
    z_enc = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation
    z_rand = shard_draw(lambda n: torch.randn(n, nz, device=A.device), half)  # (B/2, nz)
    H, W = A.shape[2:]  # the dropout masks of the two G passes: [(B/2, C, h, w), ...] each
    drop_enc = shard_draw(lambda n: nets.G.dropout_masks(n, H, W, A.device), half)
    drop_rand = shard_draw(lambda n: nets.G.dropout_masks(n, H, W, A.device), half)
    x_enc = nets.G(A_enc, z_enc, drop_enc)  # (B/2, 3, H, W) B_hat, should reconstruct B_enc
    x_rand = nets.G(A_enc, z_rand, drop_rand)  # (B/2, 3, H, W)
    return dict(B_enc=B_enc, B_rand=B_rand, mu=mu, logvar=logvar, z_rand=z_rand, x_enc=x_enc,
                x_rand=x_rand)


def ge_losses(nets, fw, cfg):
    """Weighted terms of Eq. (9) for G and E (official backward_EG + backward_G_alone)."""
    loss = dict(G_GAN=lsgan_loss(frozen_call(nets.D, fw["x_enc"]), 1.0),  # L_GAN^VAE (cVAE-GAN)
                G_GAN2=lsgan_loss(frozen_call(nets.D2, fw["x_rand"]), 1.0))  # L_GAN (cLR-GAN)
    loss["G_L1"] = cfg.lambda_l1 * l1_loss(fw["x_enc"], fw["B_enc"])
    # Summed over the global batch: under torchrun each process holds 1/N of the sum and the
    # gradients are averaged over processes, hence × N
    loss["kl"] = cfg.lambda_kl * kl_loss(fw["mu"], fw["logvar"]) * world_size()
    # §3: L1^latent trains G only (if E learnt from it too, G and E could hide z in the image
    # rather than learn modes): its gradient passes through E into G, never into E's weights.
    mu2, _ = frozen_call(nets.E, fw["x_rand"])  # (B/2, nz), E's mean (official point estimate)
    loss["z_L1"] = cfg.lambda_z * l1_loss(mu2, fw["z_rand"])
    return loss


def g_step(nets, opts, fw, cfg):
    """One Adam step of G and E on Eq. (9): GAN + GAN2 + L1 + KL (G, E) + latent L1 (G only)."""
    opts["G"].zero_grad(set_to_none=True)
    opts["E"].zero_grad(set_to_none=True)
    loss = ge_losses(nets, fw, cfg)
    sum(loss.values()).backward()
    average_gradients(opts["E"], opts["G"])  # torchrun: the global batch's gradient
    opts["E"].step()
    opts["G"].step()
    return {k: v.detach() for k, v in loss.items()}


def d_step(D, opt_D, real, fake):
    """LSGAN D step: LS(D(fake), 0) + LS(D(real), 1), fake detached (no 1/2, no penalty)."""
    opt_D.zero_grad(set_to_none=True)
    loss = lsgan_loss(D(fake.detach()), 0.0) + lsgan_loss(D(real), 1.0)
    loss.backward()
    average_gradients(opt_D)  # torchrun: the global batch's gradient
    opt_D.step()
    return loss.detach()


def train_step(nets, opts, A, B, cfg, device):
    """Official order: forward, G/E step, then D and D2 on the same (detached) fakes."""
    with autocast(device, cfg.amp):
        fw = forward(nets, A, B, cfg.nz)
        losses = g_step(nets, opts, fw, cfg)
        losses["D"] = d_step(nets.D, opts["D"], fw["B_enc"], fw["x_enc"])
        losses["D2"] = d_step(nets.D2, opts["D2"], fw["B_rand"], fw["x_rand"])
    return losses


def lr_at(step, cfg):
    """Official 'linear' policy in iterations: constant, then 1 - k / (n_decay + 1) in 2nd half."""
    n_const = cfg.total_iters // 2
    return cfg.lr * (1.0 - max(0, step + 1 - n_const) / (cfg.total_iters - n_const + 1))


def build_nets(cfg, device):
    """G, E, D, D2 with the official init: xavier_normal_(gain 0.02) weights, zero biases."""
    require(cfg.img_size >= 64 and cfg.img_size & (cfg.img_size - 1) == 0,
            f"--img-size {cfg.img_size}: use a power of two >= 64 (both PatchGAN scales need it)")
    require(cfg.where_add in ("all", "input"), "--where-add must be 'all' or 'input'")
    nets = SimpleNamespace(G=Generator(cfg.input_nc, cfg.output_nc, cfg.nz, cfg.ngf, cfg.img_size,
                                       cfg.where_add, cfg.dropout),
                           E=Encoder(cfg.output_nc, cfg.nz, cfg.nef, cfg.img_size),
                           D=MultiScaleD(cfg.output_nc, cfg.ndf),
                           D2=MultiScaleD(cfg.output_nc, cfg.ndf))
    for net in vars(nets).values():
        for m in net.modules():  # official init
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight, gain=0.02)
                nn.init.zeros_(m.bias)
        net.to(device)
        if cfg.compile:
            net.compile()  # in place: the state_dict keeps its names
    return nets


def build_optims(nets, cfg):
    """Adam(lr, betas (0.5, 0.999)) for each of G, E, D, D2; fused kernels on CUDA."""
    fused = next(nets.G.parameters()).is_cuda or None
    return {k: torch.optim.Adam(net.parameters(), cfg.lr, betas=(0.5, 0.999), fused=fused)
            for k, net in vars(nets).items()}

# ----------------------------------------------------------------------------
# 6. Sampling
# ----------------------------------------------------------------------------
@torch.no_grad()
def sample_grid(nets, A, B, z_fixed, path):
    """Rows [A, B, G(A, mu(E(B))), G(A, z_1..K)]; eval mode and z = mu, as official test.py.
    Columns titled: input A, target B, enc. z (G(A, μ(E(B))): B's style), z 1..K (random)."""
    G, (N, K) = nets.G.eval(), (A.shape[0], z_fixed.shape[0])
    x_enc = G(A, nets.E(B)[0])  # (N, 3, H, W)
    x_rand = G(A.repeat_interleave(K, 0), z_fixed.repeat(N, 1)).view(N, K, *B.shape[1:])
    G.train()
    rows = torch.cat([A.expand_as(B)[:, None], B[:, None], x_enc[:, None], x_rand], 1)
    save_grid(rows.flatten(0, 1).float(), path, nrow=3 + K,  # (N * (3 + K), 3, H, W)
              cols=["input A", "target B", "enc. z", *(f"z {k + 1}" for k in range(K))])


@torch.no_grad()
def z_interp_gif(G, A, nz, path, n_keys=5, per_segment=4, seed=0):
    """Inputs side by side, one z slerping between random codes (as official video.py)."""
    keys = torch.randn(n_keys, nz, generator=torch.Generator().manual_seed(seed)).to(A.device)
    frames = []
    for z0, z1 in zip(keys[:-1], keys[1:]):
        omega = torch.acos(F.cosine_similarity(z0, z1, 0).clamp(-1, 1))
        for t in [k / per_segment for k in range(per_segment)]:
            z = (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)
            x = G.eval()(A, z.expand(A.shape[0], nz)).float()  # (N, 3, H, W)
            frames.append(torch.cat(list(x), 2))  # (3, H, N * W)
    save_gif(frames, path, duration_ms=125)

# ----------------------------------------------------------------------------
# 7. Train
# ----------------------------------------------------------------------------
# The console line (log.jsonl has every term, lr too): the sum G and E minimise (Eq. (9), weighted
# as in ge_losses), the two Ds, then λ L1 (B̂ vs B), λ_KL KL and λ_latent L1 (ẑ vs z).
CONSOLE = {"GE": lambda v: v["G_GAN"] + v["G_GAN2"] + v["G_L1"] + v["kl"] + v["z_L1"],
           "D": "D", "D2": "D2", "L1": "G_L1", "KL": "kl", "zL1": "z_L1"}
PANELS = {"G and E (Eq. 9, weighted)": ["G_GAN", "G_GAN2", "G_L1", "kl", "z_L1"],
          "D (cVAE-GAN), D2 (cLR-GAN)": ["D", "D2"], "learning rate": ["lr"]}


def train(cfg, given=()):
    require(cfg.batch >= 2 and cfg.batch % 2 == 0, f"--batch {cfg.batch}: use an even number >= 2"
            " (per process)")
    device = init_distributed(cfg.device)  # under torchrun: this process's GPU (or the CPU)
    cfg, ckpt = prepare_run(cfg, given, FIXED)  # a resumed run: flags left out keep saved values
    seed_everything(cfg.seed)
    out, last = Path(cfg.out), Path(cfg.out) / "last.pt"
    nets = build_nets(cfg, device)
    opts, named = build_optims(nets, cfg), vars(nets)  # named: for the checkpoint
    step = start = load_checkpoint(ckpt, named, opts, map_location=device)["step"] if ckpt else 0
    check_same_weights(named)  # torchrun: one run, every process from the same weights
    stream = batch_stream(build_dataset(cfg, "train"), cfg, device, step)
    A_fix, B_fix = fixed_inputs(cfg, device)
    z_fix = torch.randn(5, cfg.nz, generator=torch.Generator().manual_seed(1)).to(device)
    logger = Logger(out, cfg.total_iters, cfg.log_every, CONSOLE, PANELS, start=step)
    losses, t0, stopped = {}, time.time(), False
    print(start_line(cfg, device, step))

    def progress(step):  # rank 0: the sample grid, the loss curves; training RNG kept
        with own_rng(device):
            sample_grid(nets, A_fix, B_fix, z_fix, out / "samples" / f"{step:07d}.png")
            logger.plot(out / "samples" / "losses.png")  # beside the samples

    try:
        # Before the first step, all the loop (and its end) does later, once: problems show in
        # the first minute, and the first grid shows the untrained G.
        if is_main():
            progress(step)
            with own_rng(device):
                if lines := toy_oracle(nets, cfg, device):
                    print(f"oracle @ {step}: " + "\n    ".join(lines))
        check_save(last, step, cfg, named, opts)
        saves = SaveTimer(cfg.save_every, cfg.save_minutes, cfg.total_iters, cfg.log_every)
        logger.t0 = time.time()  # its it/s and ETA: training steps only
        while step < cfg.total_iters:
            for group in (g for o in opts.values() for g in o.param_groups):
                group["lr"] = lr_at(step, cfg)
            A, B = next_batch(stream)  # torchrun: a data error or Ctrl-C stops all here
            losses = train_step(nets, opts, A, B, cfg, device)
            step += 1
            if step % cfg.log_every == 0:
                losses = mean_over_ranks(losses)  # torchrun: logged and checked on every process
                logger.log(step, {**losses, "lr": lr_at(step - 1, cfg)})
                check_finite(losses, step, last)  # never train on for thousands of nan steps
            if (step % cfg.sample_every == 0 or step == cfg.total_iters) and is_main():
                progress(step)
            if saves.due(step):  # every save_every steps and every save_minutes
                save_checkpoint(last, step, cfg, named, opts, losses=losses)
    except KeyboardInterrupt:  # keep the work done so far, if finite (else: one-line error)
        save_checkpoint(last, step, cfg, named, opts, losses=losses, interrupted=True)
        print()  # a new line after the ^C
        stopped = True
    except Exception as e:  # a bug: last.pt is left as it was (never a half-done step)
        report_crash(e, step, last)
        raise
    if not is_main():  # torchrun: rank 0 reports for the whole run
        return nets
    with own_rng(device):  # the same z for the same weights
        lines = [] if stopped else toy_oracle(nets, cfg, device)  # after Ctrl-C: out at once
    me = Path(__file__).name
    print_summary(me, step, start, time.time() - t0, [
        ("samples", sorted((out / "samples").glob("0*.png"))[-1:]),
        ("loss curves", [out / "samples" / "losses.png"]),
        ("checkpoint", [last, out / "log.jsonl"])], lines, [
        (f"python {me} sample --out {out}", "a grid of random z and a z GIF"),
        (f"python {me} eval --out {out}", "LPIPS diversity, L1" + (", oracle" if lines else "")),
        (f"python {me} --out {out} --resume auto --total-iters {2 * cfg.total_iters}",
         "train on")], stopped)
    return nets


def toy_oracle(nets, cfg, device):
    """The toy oracle's lines on 100 val inputs × 20 random z ([] for other data); G stays in
    train mode."""
    if cfg.data not in ("", "toy"):
        return []
    A, B = fixed_inputs(cfg, device, 100)
    x = random_outputs(nets.G, A, cfg.nz, 20)  # (100, 20, 3, H, W)
    lines = oracle_lines(oracle_scores(x, B, encoded_outputs(nets, A, B)))
    nets.G.train()
    return lines


def bench(cfg):
    """3 warm-up + bench_iters timed training steps on random data; prints one line."""
    device = init_distributed(cfg.device)  # under torchrun: its/s and images/s are global
    cuda, s = device.type == "cuda", cfg.img_size
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier one's
    nets = build_nets(cfg, device)
    opts = build_optims(nets, cfg)
    A, B = (torch.rand(cfg.batch, c, s, s, device=device) * 2 - 1 for c in (cfg.input_nc, 3))
    with flop_counter() as counter:
        train_step(nets, opts, A, B, cfg, device)
    for i in range(3 + cfg.bench_iters):  # synchronise only at the ends of the timed steps
        if i == 3:
            torch.cuda.synchronize(device) if cuda else None
            t0 = time.perf_counter()
        train_step(nets, opts, A, B, cfg, device)
    torch.cuda.synchronize(device) if cuda else None
    its, N = cfg.bench_iters / (time.perf_counter() - t0), world_size()
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else "n/a"
    print(f"bench {s}px batch {cfg.batch}{f' × {N} processes' if N > 1 else ''} {device.type}: "
          f"{sig3(its)} it/s | {sig3(its * cfg.batch * N)} images/s | peak mem {mem} | "
          f"{sig3(counter.get_total_flops() * its * N / 1e12)} TFLOP/s")


def trained_nets(cfg, ckpt, given=()):
    """sample / eval: (cfg, nets, device) of a run (common.load_run: its checkpoint fixes the
    architecture and data); G in eval mode."""
    device = pick_device(cfg.device)
    cfg, nets, _ = load_run(cfg, ckpt, lambda c, _: vars(build_nets(c, device)), given, FIXED)
    nets = SimpleNamespace(**nets)
    nets.G.eval()
    return cfg, nets, device


@torch.no_grad()
def evaluate(cfg, ckpt, n_inputs=100, n_z=20, lpips=None, given=()):
    """Official diversity: mean LPIPS of 19 consecutive pairs of 20 random-z outputs per input;
    L1 of G(A, mu(E(B))) vs B; toy oracle: shape and position kept, colour varying with z."""
    cfg, nets, device = trained_nets(cfg, ckpt, given)
    G = nets.G
    A, B = fixed_inputs(cfg, device, n_inputs)
    try:
        lpips = lpips or LPIPS("alex").to(device)
    except UserError as e:
        print(f"LPIPS diversity skipped: {e}")
    x, x_enc = random_outputs(G, A, cfg.nz, n_z), encoded_outputs(nets, A, B)  # (N, n_z, ...)
    res = dict(n_inputs=len(A), l1_rec=l1_loss(x_enc, B).item())
    if lpips:
        res["lpips_diversity"] = torch.cat([lpips(xi[:-1], xi[1:]) for xi in x]).mean().item()
    if cfg.data in ("", "toy"):
        res.update(oracle_scores(x, B, x_enc))
    print(" | ".join(f"{k} {v:.4g}" for k, v in res.items()))
    return res


@torch.no_grad()
def random_outputs(G, A, nz, n_z):
    """G(A, z) for n_z random z per input (eval mode): (N, n_z, 3, H, W) float."""
    return torch.stack([G.eval()(a.expand(n_z, -1, -1, -1), torch.randn(n_z, nz, device=A.device))
                        for a in A]).float()


@torch.no_grad()
def encoded_outputs(nets, A, B):
    """B̂ = G(A, mu(E(B))) in eval mode, z = mu as official test.py: (N, 3, H, W) float."""
    return nets.G.eval()(A, nets.E(B)[0]).float()


def oracle_scores(x, B, x_enc):
    """Toy: the outputs x (N, n_z, 3, H, W) should keep their target B's shape and position
    while z picks the colour; x_enc = G(A, mu(E(B))) (N, 3, H, W) should take B's colour
    (data/toy.read_shapes reads all three)."""
    N, n_z = x.shape[:2]
    truth, r, enc = read_shapes(B), read_shapes(x.flatten(0, 1)), read_shapes(x_enc)
    t = {k: v.repeat_interleave(n_z, 0) for k, v in truth.items()}
    d_pos = ((r["cx"] - t["cx"]).abs() + (r["cy"] - t["cy"]).abs()) / 2  # (N * n_z,)

    def color_err(f, color):  # mean |Δ| of the RGB colour in [0, 1], over readable outputs
        return (f["color"] - color).abs().mean(1)[f["valid"]].mean().item()

    return dict(valid=r["valid"].float().mean().item(), pos_err=d_pos.mean().item(),
                shape_kept=(r["domain"] == t["domain"]).float().mean().item(),
                color_std_over_z=r["color"].view(N, n_z, 3).std(1).mean().item(),
                color_std_real=truth["color"].std(0).mean().item(),
                # The random-z outputs' error against B is the chance level for the encoded one.
                color_err_enc=color_err(enc, truth["color"]),
                color_err_rand=color_err(r, t["color"]))


def oracle_lines(s):
    """What the oracle read, as lines for the console and the summary."""
    err = lambda e: "- (no readable output)" if math.isnan(e) else f"{e:.3f}"  # noqa: E731
    return [f"valid {s['valid']:.1%} | shape kept {s['shape_kept']:.2f}, position error "
            f"{s['pos_err']:.3f} of the side | colour std over z {s['color_std_over_z']:.3f} "
            f"(real images {s['color_std_real']:.3f})",
            f"encoded z, G(A, μ(E(B))): colour error vs B {err(s['color_err_enc'])} "
            f"(random z: {err(s['color_err_rand'])})"]

# ----------------------------------------------------------------------------
# 8. Entry point
# ----------------------------------------------------------------------------
def main(argv=None):
    extra = ((("--ckpt",), dict(default="", help="sample/eval checkpoint (default out/last.pt)")),)
    cfg, ns = parse_config(Config, PRESETS, argv, __doc__, ("train", "sample", "eval"), extra)
    check_flags(cfg, positive="lr total_iters log_every sample_every save_every",
                nonneg="num_workers save_minutes")
    if cfg.bench:
        return bench(cfg)
    if ns.mode == "train":
        return train(cfg, ns.given)
    if ns.mode == "eval":
        return evaluate(cfg, ns.ckpt, given=ns.given)
    cfg, nets, device = trained_nets(cfg, ns.ckpt, ns.given)
    A, B = fixed_inputs(cfg, device)
    z = torch.randn(10, cfg.nz, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    sample_grid(nets, A, B, z, Path(cfg.out) / "sample_grid.png")
    z_interp_gif(nets.G, A, cfg.nz, Path(cfg.out) / "z_interp.gif", seed=cfg.seed)
    print(f"wrote {cfg.out}/sample_grid.png and {cfg.out}/z_interp.gif")


if __name__ == "__main__":
    main_guard(main)

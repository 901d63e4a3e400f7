"""The pretrained backbones of the evaluation metrics: FID's Inception-v3 pool features and LPIPS
v0.1 (AlexNet for StarGAN v2 and BicycleGAN's diversity, VGG16 for StyleGAN's PPL).

They live under data/, beside the FAN, because like it they are other papers' pretrained networks
that score images, not part of any method: 02, 03 and 04 import them only in their `eval` modes.
Their weights come from torchvision and the official LPIPS release, fetched once with
`python data/download.py weights`."""
import torch
import torch.nn as nn
import torchvision

from common import UserError


def _fetch(what, fn):
    try:
        return fn()
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not get the pretrained {what} weights ({type(e).__name__}); run "
                        "`python data/download.py weights` on a machine with network access "
                        f"(they go to {torch.hub.get_dir()}/checkpoints)") from None


def frechet_distance(feats1, feats2):
    """‖μ1 − μ2‖² + Tr(C1 + C2 − 2 (C1 C2)^½) in float64; (C1 C2)^½ via two symmetric eigh."""
    f1, f2 = feats1.double(), feats2.double()
    mu1, mu2, c1, c2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    vals, vecs = torch.linalg.eigh(c1)
    sqrt_c1 = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_c1 @ c2 @ sqrt_c1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * cross).item()


class InceptionPool(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> (B, 2048) average-pool features of torchvision Inception-v3."""
    def __init__(self, pretrained=True):
        super().__init__()
        weights = "IMAGENET1K_V1" if pretrained else None
        self.net = _fetch("Inception-v3", lambda: torchvision.models.inception_v3(
            weights=weights, aux_logits=True, transform_input=False, init_weights=not pretrained))
        self.net.fc = nn.Identity()
        self.net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x):
        x = nn.functional.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear")
        self.net.eval()
        return self.net((x - self.mean) / self.std)  # (B, 2048); fc is the identity


class LPIPS(nn.Module):
    """LPIPS v0.1: unit-normalise each ReLU stage's channels, weight the squared difference by
    learned 1×1 weights, average over space, sum over stages. forward(x, y) in [-1, 1] -> (B,)."""
    TAPS = {"alex": ("alexnet", [1, 4, 7, 9, 11], [64, 192, 384, 256, 256]),
            "vgg": ("vgg16", [3, 8, 15, 22, 29], [64, 128, 256, 512, 512])}
    URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/{}.pth"

    def __init__(self, net="alex", pretrained=True):
        super().__init__()
        arch, taps, chans = self.TAPS[net]
        weights = "IMAGENET1K_V1" if pretrained else None
        backbone = _fetch(net, lambda: torchvision.models.get_model(arch, weights=weights))
        self.features = backbone.features[: taps[-1] + 1].eval().requires_grad_(False)
        self.taps = set(taps)
        self.lins = nn.ParameterList([nn.Parameter(torch.rand(1, c, 1, 1)) for c in chans])
        if pretrained:
            sd = _fetch(f"LPIPS {net}", lambda: torch.hub.load_state_dict_from_url(
                self.URL.format(net), file_name=f"lpips_v0.1_{net}.pth", map_location="cpu"))
            for i, p in enumerate(self.lins):
                p.data.copy_(sd[f"lin{i}.model.1.weight"])
        self.requires_grad_(False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def _stages(self, x):
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        d = [(w * (a - b).square()).sum(1).mean((1, 2))
             for w, a, b in zip(self.lins, self._stages(x), self._stages(y))]
        return torch.stack(d).sum(0)  # (B,)



"""StarGAN v2's helper network from another paper: the face-alignment network (FAN, Wang et al.,
"Adaptive Wing Loss", ICCV 2019) whose heatmaps give the CelebA-HQ generator its face masks, and
the face alignment onto CelebA-HQ's mean landmarks (the official `align` mode). Kept apart from
02, as the official code keeps it in core/wing.py: it prepares and masks faces, it is not the
method. Weights: `python data/download.py wing`."""
import zipfile
from pathlib import Path

import numpy
import torch
import torch.nn as nn
from torchvision.transforms import v2

from common import UserError, _first_line, require, strip_prefixes


def _bn_relu_conv(c_in, c_out, k):
    return [nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False)]


class _FanBlock(nn.Module):
    """Hierarchical residual block: three BN-ReLU-3×3 convs to C/2, C/4, C/4 channels, their
    outputs concatenated to C, plus the input (through BN-ReLU-1×1 when the width changes)."""
    def __init__(self, c_in, c_out):
        super().__init__()
        widths = (c_in, c_out // 2, c_out // 4, c_out // 4)
        for i in range(3):  # official names: bn1 conv1 bn2 conv2 bn3 conv3
            bn, _, conv = _bn_relu_conv(widths[i], widths[i + 1], 3)
            self.add_module(f"bn{i + 1}", bn)
            self.add_module(f"conv{i + 1}", conv)
        self.downsample = nn.Sequential(*_bn_relu_conv(c_in, c_out, 1)) if c_in != c_out else None

    def forward(self, x):
        h, outs = x, []
        for i in (1, 2, 3):
            h = getattr(self, f"conv{i}")(torch.relu(getattr(self, f"bn{i}")(h)))
            outs.append(h)
        return torch.cat(outs, 1) + (x if self.downsample is None else self.downsample(x))


class _CoordConv(nn.Module):
    """Conv on [x, i, j, r]: the row and column coordinates in [-1, 1] and the radius / its max,
    so the landmark heads know where in the image a feature is (CoordConv, Liu et al. 2018)."""
    def __init__(self, c_in, c_out, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 3, c_out, k, stride, k // 2)

    def forward(self, x):
        B, _, H, W = x.shape
        i = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)[:, None].expand(H, W)
        j = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)[None, :].expand(H, W)
        r = (i.square() + j.square()).sqrt()
        coords = torch.stack([i, j, r / r.max()]).expand(B, 3, H, W)  # (B, 3, H, W)
        return self.conv(torch.cat([x, coords], 1))


class FAN(nn.Module):
    """The official face-alignment network of StarGAN v2 (AdaptiveWing FAN, one 4-level
    hourglass): x (B, 3, 256, 256) in [0, 1] -> 98 landmark heatmaps + 1 boundary map at 64×64.
    Frozen: BatchNorm always uses its running statistics (train() keeps it in eval mode)."""
    def __init__(self, depth=4, width=256, n_landmarks=98):
        super().__init__()
        self.depth = depth
        self.conv1 = _CoordConv(3, 64, 7, 2)  # 128×128
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2, self.conv3, self.conv4 = _FanBlock(64, 128), _FanBlock(128, 128), \
            _FanBlock(128, width)
        self.m0 = nn.Module()  # the hourglass, named as in wing.ckpt
        self.m0.coordconv = _CoordConv(width, width, 1, 1)
        for level in range(depth, 0, -1):  # registration order = the official key order
            self.m0.add_module(f"b1_{level}", _FanBlock(width, width))
            self.m0.add_module(f"b2_{level}", _FanBlock(width, width))
        self.m0.b2_plus_1 = _FanBlock(width, width)
        for level in range(1, depth + 1):
            self.m0.add_module(f"b3_{level}", _FanBlock(width, width))
        self.top_m_0 = _FanBlock(width, width)
        self.conv_last0 = nn.Conv2d(width, width, 1)
        self.bn_end0 = nn.BatchNorm2d(width)
        self.l0 = nn.Conv2d(width, n_landmarks + 1, 1)
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    def _hourglass(self, x, level):
        """up = b1(x); low = b3(inner(b2(pool(x)))); up + nearest ×2 upsampling of low."""
        m = self.m0
        low = getattr(m, f"b2_{level}")(nn.functional.avg_pool2d(x, 2))  # H/2
        low = self._hourglass(low, level - 1) if level > 1 else m.b2_plus_1(low)
        low = getattr(m, f"b3_{level}")(low)
        return getattr(m, f"b1_{level}")(x) + nn.functional.interpolate(low, scale_factor=2.0)

    def forward(self, x):
        """x (B, 3, 256, 256) in [0, 1] -> heatmaps (B, 99, 64, 64)."""
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 64, 128, 128)
        x = nn.functional.avg_pool2d(self.conv2(x), 2)  # (B, 128, 64, 64)
        x = self.conv4(self.conv3(x))  # (B, 256, 64, 64)
        x = self.top_m_0(self._hourglass(self.m0.coordconv(x), self.depth))
        return self.l0(torch.relu(self.bn_end0(self.conv_last0(x))))  # (B, 99, 64, 64)

    @torch.no_grad()
    def heatmaps(self, x):
        """x (B, 3, H, W) in [-1, 1] -> the 98 landmark heatmaps (B, 98, 256, 256), float32."""
        with torch.autocast(x.device.type, enabled=False):  # the mask powers need fp32
            x = nn.functional.interpolate(x.float(), size=256, mode="bilinear")
            heat = self(x * 0.5 + 0.5)[:, :-1]  # (B, 98, 64, 64): the boundary map is unused
            return nn.functional.interpolate(heat, size=256, mode="bilinear", align_corners=True)

    def masks(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (whole face, eyes + nose), each (B, 1, 256, 256)."""
        return face_masks(self.heatmaps(x))

    @torch.no_grad()
    def landmarks(self, x):
        """x (B, 3, H, W) in [-1, 1] -> 98 landmarks (B, 98, 2) as (x, y) pixels of x."""
        with torch.autocast(x.device.type, enabled=False):
            heat = self(nn.functional.interpolate(x.float(), size=256, mode="bilinear") * 0.5
                        + 0.5)[:, :-1]  # (B, 98, 64, 64)
        return heat_peaks(heat) * (x.shape[2] / heat.shape[2])  # official: // (same at 256)


# Landmark index ranges of the 98-point (WFLW) layout, end excluded, and what face_masks does with
# each: (rows to move the map up, negative = down; power that sharpens it). Official values.
_MASK_PARTS = {"chin": (8, 25, 0, 3), "eyebrows": (33, 51, -7, 2), "nostrils": (55, 60, 8, 4),
               "lip_upper": (77, 82, -8, 4), "lip_lower": (83, 88, 8, 4),
               "lip_inner": (88, 96, -2, 3)}


def face_masks(heat):
    """The official heatmap-to-mask recipe: heat (B, 98, H, W), H = 256 -> two (B, 1, H, W) masks
    in [0, 1]: [0] every kept part (used at 32 px), [1] without jaw line, mouth and eyebrows."""
    up = lambda h, rows: torch.roll(h, -rows, dims=2)  # noqa: E731 (content moves up, wraps)
    sw = heat.shape[2] // 256  # the shifts are in pixels of a 256-px image
    x = torch.where(heat < 0.1, torch.zeros_like(heat), heat)  # drop the faint tails
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    x = (x - lo) / (hi - lo + 1e-6)  # each map min-max normalised to [0, 1]
    for a, b, rows, power in _MASK_PARTS.values():
        x[:, a:b] = up(x[:, a:b], rows * sw) ** power
    x[:, list(range(0, 8)) + list(range(25, 33)) + [33, 46, 76, 82]] = 0  # outer jaw, corners
    x[:, 52:55] = up(x[:, 52:55], 4 * sw)  # nose ridge (52-54; 51, its top, stays)
    x[:, 60:76] = up(x[:, 60:76], -8) ** 3 + up(x[:, 60:76], -24)  # eyes (official: not × sw)
    x2 = x.clone()
    x2[:, 8:25] = x2[:, 33:51] = x2[:, 76:96] = 0  # second level: no jaw line, eyebrows, mouth
    return tuple(m.sum(1, keepdim=True).nan_to_num(0).clamp(0, 1) for m in (x, x2))


def load_fan(path, device="cpu"):
    """wing.ckpt ({'state_dict': ...}) -> a frozen FAN in eval mode; entries matched by name, extra
    entries ignored (as official), a missing or mis-shaped one refused with one line."""
    fix = "get it with `python data/download.py wing` (or pass --wing PATH)"
    require(Path(path).is_file(), f"{path}: no FAN weights (wing.ckpt) here; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding pickled Python objects
        raise UserError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}); "
                        f"delete it and {fix}") from None
    state = strip_prefixes(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {})
    fan = FAN()
    for key, want in fan.state_dict().items():
        got = state.get(key)
        require(got is not None, f"{path}: no entry '{key}'; not the StarGAN v2 wing.ckpt? {fix}")
        require(got.shape == want.shape, f"{path}: '{key}' is {tuple(got.shape)}, expected "
                f"{tuple(want.shape)}; not the StarGAN v2 wing.ckpt? {fix}")
    fan.load_state_dict({k: state[k] for k in fan.state_dict()})
    return fan.to(device)


def heat_peaks(heat):
    """Official read-out: argmax of each map, a quarter pixel toward the higher neighbour (away
    from the border), centred: heat (B, L, h, w) -> (B, L, 2) as (x, y) in heatmap pixels."""
    B, L, h, w = heat.shape
    idx = heat.flatten(2).argmax(2)  # (B, L)
    row, col = idx // w, idx % w
    inner = (row > 0) & (row < h - 1) & (col > 0) & (col < w - 1)
    r0, r1, c0, c1 = ((v + d).clamp(0, n - 1) for v, d, n in
                      ((row, -1, h), (row, 1, h), (col, -1, w), (col, 1, w)))
    at = lambda r, c: heat.flatten(2).gather(2, (r * w + c)[..., None])[..., 0]  # noqa: E731
    dx, dy = (at(row, c1) - at(row, c0)).sign(), (at(r1, col) - at(r0, col)).sign()
    xy = torch.stack([col + 0.25 * dx * inner, row + 0.25 * dy * inner], -1)  # (B, L, 2)
    return xy.float() + 0.5  # the official 1-based index minus 0.5


# ---- Face alignment onto the mean CelebA-HQ landmarks (the official `align` mode)
def read_npz(path, key=None):
    """A NumPy .npz or .npy file (numpy.load, pickles refused): {name: tensor}, or the tensor
    `key`. Floating-point arrays only (the landmark files hold float32)."""
    try:
        data = numpy.load(path, allow_pickle=False)
        arrays = dict(data) if isinstance(data, numpy.lib.npyio.NpzFile) else {"": data}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read ({_first_line(e)}); get it with "
                        "`python data/download.py wing`") from None
    for name, a in arrays.items():
        require(a.dtype.kind == "f", f"{path}: array '{name}' has dtype {a.dtype}; floating-point "
                "landmarks expected")
    if key is not None:
        require(key in arrays, f"{path}: no array '{key}' (has {sorted(arrays)})")
    tensors = {k: torch.from_numpy(a.astype(a.dtype.newbyteorder("="), order="C"))
               for k, a in arrays.items() if key is None or k == key}
    return tensors if key is None else tensors[key]


def similarity_to(lm, ref):
    """The official landmark alignment (3, 3): move lm's mean to the origin, rotate its face x-axis
    onto ref's, scale by the mean distance ratio of eyes + mouth ends, move to ref's mean."""
    def xaxis(p):  # eye-to-eye minus the 90°-rotated eye-centre-to-mouth-centre vector
        eye_l, eye_r = p[[*range(60, 68), 96]].mean(0), p[[*range(68, 76), 97]].mean(0)
        up = (eye_l + eye_r) / 2 - (p[76] + p[82]) / 2
        v = eye_r - eye_l - torch.stack([up[1], -up[0]])
        return v / v.norm()

    def shift(t):
        m = torch.eye(3, dtype=torch.float64)
        m[:2, 2] = t
        return m

    lm, ref = lm.double(), ref.double()
    a, b = xaxis(lm), xaxis(ref)
    cos, sin = a @ b, a[0] * b[1] - a[1] * b[0]  # the angle from lm's axis to ref's
    rot = torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64)
    keys = [96, 97, 76, 82]  # eye centres, mouth ends
    scale = ((ref - ref.mean(0)).norm(dim=1) / (lm - lm.mean(0)).norm(dim=1))[keys].mean()
    return shift(ref.mean(0)) @ torch.diag(torch.stack([scale, scale, scale.new_ones(())])) \
        @ rot @ shift(-lm.mean(0))


def mirror_pad(img, lm):
    """img (3, H, W) in [0, 1]: reflect-pad by half the size, fade the padding into a blurred copy
    (fewer mirrored features at the edges of an aligned face), as official; lm moves with it."""
    H, W = img.shape[1:]
    img = nn.functional.pad(img[None], (W // 2, W // 2, H // 2, H // 2), mode="reflect")[0]
    Hp, Wp = img.shape[1:]
    sigma = H // 100
    blurred = nn.functional.interpolate(img[None], size=(H, W), mode="bilinear")
    if sigma > 0:  # kernel truncated at 4 sigma as scikit-image's; edges reflect, not repeat
        blurred = v2.functional.gaussian_blur(blurred, [2 * 4 * sigma + 1] * 2, [float(sigma)] * 2)
    blurred = nn.functional.interpolate(blurred, size=(Hp, Wp), mode="bilinear")[0]
    ramp = lambda n: torch.minimum(torch.arange(n), torch.arange(n).flip(0)) / (Hp // 4)  # noqa
    weight = torch.minimum(ramp(Hp)[:, None], ramp(Wp)[None]).clamp(max=1) ** 4  # (Hp, Wp)
    return img * weight + blurred * (1 - weight), lm + torch.tensor([Wp // 4, Hp // 4])


def warp(img, matrix, size):
    """out(p) = img(matrix⁻¹ p) on a size×size grid, bicubic (official: Lanczos), pixel centres
    at integers; img (3, H, W) -> (3, size, size)."""
    def to_norm(w, h):  # pixel centre p -> grid_sample's (2p + 1) / n - 1 (align_corners False)
        return torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]],
                            dtype=torch.float64)

    H, W = img.shape[1:]
    theta = to_norm(W, H) @ torch.linalg.inv(matrix) @ torch.linalg.inv(to_norm(size, size))
    grid = nn.functional.affine_grid(theta[None, :2].float(), [1, 3, size, size],
                                     align_corners=False)
    return nn.functional.grid_sample(img[None], grid, mode="bicubic", align_corners=False)[0]


def align_face(x, lm, ref):
    """x (3, H, W) in [-1, 1], its landmarks lm (98, 2) -> (3, S, S) aligned onto ref, S = H."""
    img, lm = mirror_pad((x + 1) / 2, lm)
    return (warp(img, similarity_to(lm, ref), x.shape[1]) * 2 - 1).clamp(-1, 1)


def align_faces(fan, x, ref):
    """x (B, 3, S, S) in [-1, 1] -> each face aligned onto the reference landmarks ref (98, 2)."""
    lms = fan.landmarks(x).cpu()  # (B, 98, 2)
    return torch.stack([align_face(img, lm, ref) for img, lm in zip(x.cpu().float(), lms)])

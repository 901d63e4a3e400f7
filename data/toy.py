"""Built-in toy domains and the oracle that reads their factors back from pixels.

The toy sets are written in the *same on-disk formats* as the real datasets, so the scripts and the
tests go through the real readers in data/datasets.py:

  shapes  AFHQ-like domain folders   root/{train,val}/{circle,square,triangle}/00000.png
          domain = shape (the analogue of cat / dog / wild); style = object colour + stripe texture
          (continuous, so latent and reference styles have something to capture); content = position
          and size (must survive a translation). Plain dark-grey background.
  scenes  AFHQ-like domain folders   root/{train,val}/{day,dusk,night}/00000.png, for StarGAN v2
          domain = the sky (a vertical gradient per domain); style = object colour; content = the
          object's shape, position and size (must survive a translation). A sky is a global change
          a small generator and discriminator learn in a few CPU minutes; a shape change is not
          (measured: README, "What you will see").
  faces   CelebA-like attributes     root/images/000001.jpg + root/list_attr_celeba.txt (official format)
          aligned "faces" whose Black_Hair / Blond_Hair / Brown_Hair (exclusive; some have grey hair =
          none of the three), Male (a beard) and Young (rosy cheeks) are each one visible factor.

read_shapes / read_scenes / read_faces are the oracle: they recover those factors from an image (a
real toy image or a translation), so a script can score what a translation kept and what it changed.
"""
import contextlib
import math
import os
import random
import shutil
from pathlib import Path

import torch
from torchvision.io import encode_jpeg, write_file, write_png

SHAPES = ("circle", "square", "triangle")
SCENES = ("day", "dusk", "night")
FACE_ATTRS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Young")
CELEBA_40 = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
BG = torch.tensor([0.12, 0.12, 0.12])  # shapes background, RGB in [0, 1]
HAIR = torch.tensor([[0.08, 0.07, 0.07], [0.93, 0.82, 0.45], [0.45, 0.28, 0.14], [0.72, 0.72, 0.74]])
# Sky per scene domain: (top, bottom) RGB of a vertical gradient. Scene objects have value ≥ 0.75
# and saturation ≥ 0.6, so every object differs from every sky by > 0.2 in some channel.
SKY = torch.tensor([[[0.62, 0.78, 0.95], [0.90, 0.93, 0.96]],    # day: pale blue to white
                    [[0.40, 0.34, 0.48], [0.50, 0.40, 0.42]],    # dusk: mauve to muted rose
                    [[0.03, 0.04, 0.10], [0.08, 0.10, 0.20]]])   # night: near-black to navy
BEARD, CHEEK = torch.tensor([0.20, 0.14, 0.10]), torch.tensor([0.90, 0.30, 0.35])


def _grid(h, w):
    """Pixel-centre coordinates in units of the image *width*: (H, W) each."""
    ys = (torch.arange(h) + 0.5) / w
    xs = (torch.arange(w) + 0.5) / w
    return torch.meshgrid(ys, xs, indexing="ij")


def _hsv(h, s, v):
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # (3,)


def _soft(d, size):
    """Signed distance (negative inside) -> coverage with a one-pixel anti-aliased edge."""
    return torch.clamp(0.5 - d * size, 0, 1)


def _shape_sdf(shape, size, rng, halves=(0.16, 0.28)):
    """Signed distance (H, W) to a random circle / square / triangle; grid, centre, half-size
    drawn from `halves` (in units of the side)."""
    yy, xx = _grid(size, size)
    half = rng.uniform(*halves)
    cx, cy = (rng.uniform(half + 0.04, 1 - half - 0.04) for _ in range(2))
    if shape == "circle":
        d = torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - half
    elif shape == "square":
        d = torch.maximum((xx - cx).abs(), (yy - cy).abs()) - half
    else:  # isosceles triangle, apex up: half-width grows linearly from 0 at the apex to `half`
        d = torch.maximum(yy - (cy + half), (xx - cx).abs() - (yy - cy + half) / 2)
    return d, xx, yy, cx, cy, half


def render_shape(shape, size, rng):
    """One shapes image (3, size, size) in [0, 1] and its factors. At 32 px and below the object
    is larger (half-side 0.24-0.36 of the image, not 0.16-0.28): a 10-18 px circle and square
    differ in a few anti-aliased corner pixels. 04's discriminator, trained alone with real circles as
    its fakes, then rated real squares 0.03 above circles after 300 steps (0.62 at the larger
    size), and its generator drew circles only."""
    halves = (0.24, 0.36) if size <= 32 else (0.16, 0.28)
    d, xx, yy, cx, cy, half = _shape_sdf(shape, size, rng, halves)
    color = _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))
    freq, angle, amp = rng.uniform(2, 6), rng.uniform(0, math.pi), rng.uniform(0.0, 0.3)
    phase = 2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) / (2 * half)
    texture = 1 - amp * (0.5 + 0.5 * torch.sin(phase))  # stripes darken by up to 30 %
    m = _soft(d, size)
    img = BG.view(3, 1, 1) * (1 - m) + color.view(3, 1, 1) * texture * m
    return img, dict(cx=cx, cy=cy, half=half, color=color.tolist())


def sky(domain, size):
    """The scene domain's background (3, size, size): a vertical gradient, SKY's top to bottom."""
    t = ((torch.arange(size) + 0.5) / size).view(1, size, 1)
    top, bottom = SKY[domain].view(2, 3, 1, 1)
    return torch.lerp(top, bottom, t).expand(3, size, size)


def render_scene(domain, size, rng, shape=None):
    """One scenes image (3, size, size) in [0, 1]: a plain object (random shape, position, size,
    colour) in front of the sky of `domain` (an index into SCENES); shape: fixed instead."""
    drawn = rng.randrange(len(SHAPES))  # drawn even when fixed: the later images stay the same
    shape = drawn if shape is None else shape
    d, *_, cx, cy, half = _shape_sdf(SHAPES[shape], size, rng)
    color = _hsv(rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 0.95))
    m = _soft(d, size)
    img = sky(domain, size) * (1 - m) + color.view(3, 1, 1) * m
    return img, dict(shape=shape, cx=cx, cy=cy, half=half, color=color.tolist())


def render_face(width, rng):
    """One aligned toy face (3, H, W) in [0, 1], H = W·218/178 like CelebA, and its 5 attributes."""
    height = round(width * 218 / 178)
    yy, xx = _grid(height, width)
    yy = yy - (height - width) / 2 / width  # square-crop coordinates: the face lives in the centre
    cx, cy, s = 0.5 + rng.uniform(-0.02, 0.02), 0.55 + rng.uniform(-0.02, 0.02), rng.uniform(0.95, 1.05)
    hair = rng.choices(range(4), weights=[0.3, 0.25, 0.3, 0.15])[0]
    male, young = rng.random() < 0.45, rng.random() < 0.75
    bg = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.65))
    tone = rng.random()
    skin = torch.tensor([0.96, 0.80, 0.69]) * (1 - tone) + torch.tensor([0.55, 0.38, 0.26]) * tone
    img = bg.view(3, 1, 1).expand(3, height, width).clone()

    def paint(mask, color):
        img.mul_(1 - mask).add_(mask * color.view(3, 1, 1))

    head = _soft(torch.sqrt(((xx - cx) / 0.26) ** 2 + ((yy - cy) / 0.33) ** 2) - s, 0.3 * width)
    paint(head, skin)
    cap = _soft(torch.sqrt(((xx - cx) / 0.29) ** 2 + ((yy - cy + 0.13) / 0.22) ** 2) - s, 0.3 * width)
    paint(cap * (yy < cy - 0.14), HAIR[hair] * rng.uniform(0.95, 1.05))
    if male:
        paint(head * (yy > cy + 0.14), BEARD)
    if young:
        for side in (-1, 1):
            paint(_soft(torch.sqrt((xx - cx - side * 0.14) ** 2 + (yy - cy - 0.05) ** 2) - 0.06,
                        width), CHEEK)
    for side in (-1, 1):  # eyes: no attribute, just so it reads as a face
        paint(_soft(torch.sqrt((xx - cx - side * 0.1) ** 2 + (yy - cy + 0.03) ** 2) - 0.03, width),
              torch.tensor([0.1, 0.1, 0.12]))
    attrs = dict(Black_Hair=hair == 0, Blond_Hair=hair == 1, Brown_Hair=hair == 2, Gray_Hair=hair == 3,
                 Male=male, Young=young, No_Beard=not male, Rosy_Cheeks=young)
    return img.clamp(0, 1), attrs


def _u8(img):
    return (img * 255).round().to(torch.uint8)


def write_shapes(root, size, n_train=400, n_val=50, seed=0):
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for shape in SHAPES:
            folder = Path(root, split, shape)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_png(_u8(render_shape(shape, size, rng)[0]), str(folder / f"{i:05d}.png"))


def write_scenes(root, size, n_train=400, n_val=50, seed=0):
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, scene in enumerate(SCENES):
            folder = Path(root, split, scene)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):  # val's first 4 (the sample grids' sources and references):
                shape = (i + k) % len(SHAPES) if split == "val" and i < 4 else None  # every shape
                write_png(_u8(render_scene(k, size, rng, shape)[0]), str(folder / f"{i:05d}.png"))


def write_faces(root, width, n=2000, seed=0):
    rng = random.Random(seed)
    (Path(root) / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, n + 1):
        img, attrs = render_face(width, rng)
        name = f"{i:06d}.jpg"
        write_file(str(Path(root, "images", name)), encode_jpeg(_u8(img), quality=95))
        rows.append(name + " " + " ".join("1" if attrs.get(a) else "-1" for a in CELEBA_40))
    Path(root, "list_attr_celeba.txt").write_text(f"{n}\n{' '.join(CELEBA_40)}\n" + "\n".join(rows) + "\n")


# The generators' version, kept in a set's .complete: a set on disk from an older generator is
# rewritten, so a changed generator (2: larger objects at 32 px) reaches every clone.
VERSION = "2"


def make_toy(kind, root, size):
    """Write the toy set `kind` at `root` once; a half-written set is never left behind."""
    root, done = Path(root), Path(root) / ".complete"
    current = lambda: done.is_file() and done.read_text().strip() == VERSION  # noqa: E731
    if current():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    again = " (the generator changed since it was written)" if done.exists() else ""
    print(f"writing the built-in toy '{kind}' data to {root}{again} (once, a few seconds)")
    {"shapes": write_shapes, "scenes": write_scenes, "faces": write_faces}[kind](tmp, size)
    (tmp / ".complete").write_text(VERSION + "\n")
    if root.exists() and not current():  # an older set: out of the way, then gone
        with contextlib.suppress(OSError):  # another process moved it first
            old = root.with_name(f"{root.name}.old{os.getpid()}")
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first; its copy is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------
def read_shapes(x):
    """x (B, 3, H, W) in [-1, 1] -> factors of each image; `valid` is False when no single toy
    object on the toy background can be seen (e.g. noise, an empty image, a smeared blob)."""
    img = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return _read_object(img, (img - BG.view(1, 3, 1, 1)).abs().amax(1) > 0.2)


def read_scenes(x):
    """x (B, 3, H, W) in [-1, 1] -> the scene domain (the sky nearest to the image's left and right
    edges, row by row; -1 if none is within 0.15) and the object's factors, read as read_shapes
    does against that measured sky (colour from the object's core); its shape index is `shape`."""
    img = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    B, _, H, W = img.shape
    edge = torch.cat([img[..., :2], img[..., -2:]], 3).median(3).values  # (B, 3, H): sky per row
    protos = torch.stack([sky(k, H)[..., 0] for k in range(len(SKY))])  # (K, 3, H): one column
    dist = (edge[:, None] - protos[None]).abs().mean(2).median(2).values  # (B, K); rows the
    # object reaches into are outliers, so the median row decides
    near, domain = dist.min(1)
    # Rows whose edge pixels are not sky (the object reaches the border) take the domain's sky.
    proto = protos[domain]  # (B, 3, H)
    off = ((edge - proto).abs().amax(1, keepdim=True) > 0.1) & (near < 0.15).view(B, 1, 1)
    mask = (img - torch.where(off, proto, edge)[..., None]).abs().amax(1) > 0.2
    out = _read_object(img, mask)
    # Colour from the object's core (mask eroded by one pixel): at 16 px the anti-aliased rim
    # is a third of the object and would pull the mean toward the sky.
    core = -torch.nn.functional.max_pool2d(-mask[:, None].float(), 3, 1, 1)[:, 0] > 0.5
    for b in (core.flatten(1).sum(1) > 0).nonzero()[:, 0].tolist():
        out["color"][b] = img[b][:, core[b]].mean(1)
    out["shape"], out["domain"] = out["domain"], torch.where(near < 0.15, domain, -1)
    out["valid"] &= near < 0.15
    return out


def _read_object(img, mask):
    """img (B, 3, H, W) in [0, 1], mask (B, H, W) of object pixels -> the object's factors;
    `domain` is the shape index (circle, square, triangle)."""
    B, _, H, W = img.shape
    out = {k: torch.zeros(B) for k in ("cx", "cy", "size")}
    out.update(valid=torch.zeros(B, dtype=torch.bool), domain=torch.full((B,), -1),
               color=torch.zeros(B, 3))
    for b in range(B):
        ys, xs = mask[b].nonzero(as_tuple=True)
        area = ys.numel() / (H * W)
        if not 0.02 <= area <= 0.6:
            continue
        # Extent from the row / column profiles, ignoring rows and columns with < 5 % of the widest
        # one's pixels: stray pixels of a generated image then do not inflate the bounding box.
        rows, cols = mask[b].sum(1).float(), mask[b].sum(0).float()
        r_on, c_on = (rows >= 0.05 * rows.max()).nonzero(), (cols >= 0.05 * cols.max()).nonzero()
        h, w = (r_on.max() - r_on.min() + 1).item(), (c_on.max() - c_on.min() + 1).item()
        fill = ys.numel() / (h * w)
        ys, xs = ys.float(), xs.float()
        drop = (ys.mean().item() - (r_on.min() + r_on.max()).item() / 2) / h  # triangle: ≈ +1/6
        if fill < 0.35:
            continue
        out["domain"][b] = 1 if fill > 0.88 else (2 if fill < 0.62 or drop > 0.08 else 0)
        out["valid"][b] = True
        out["cx"][b], out["cy"][b] = (xs.mean() + 0.5) / W, (ys.mean() + 0.5) / H
        out["size"][b] = math.sqrt(area)
        out["color"][b] = img[b][:, mask[b]].mean(1)
    return out


def _region(img, u0, u1, v0, v1):
    S = img.shape[-1]
    return img[:, :, int(v0 * S):max(int(v1 * S), int(v0 * S) + 1),
               int(u0 * S):max(int(u1 * S), int(u0 * S) + 1)].mean((2, 3))  # (B, 3)


def read_faces(x):
    """x (B, 3, S, S) in [-1, 1], square-cropped as CelebAAttrs returns it -> FACE_ATTRS bits."""
    img = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)
    hair = _region(img, 0.40, 0.60, 0.26, 0.36)
    hair_cls = torch.cdist(hair, HAIR).argmin(1)  # nearest prototype: black, blond, brown, grey
    beard = _region(img, 0.42, 0.58, 0.76, 0.82).mean(1)
    cheeks = (_region(img, 0.32, 0.40, 0.57, 0.63) + _region(img, 0.60, 0.68, 0.57, 0.63)) / 2
    redness = cheeks[:, 0] - (cheeks[:, 1] + cheeks[:, 2]) / 2
    attrs = torch.stack([hair_cls == 0, hair_cls == 1, hair_cls == 2, beard < 0.30, redness > 0.38], 1)
    face = img[:, :, int(0.3 * img.shape[-1]):int(0.8 * img.shape[-1])]
    # Readable = a face is there: hair near a prototype and no pixel noise (uniform noise ≈ 0.33;
    # real toy faces ≤ 0.06; grainy translations whose regions still read right ≈ 0.06-0.10).
    roughness = (face[..., 1:] - face[..., :-1]).abs().mean((1, 2, 3))
    dist = torch.cdist(hair, HAIR).min(1).values
    return dict(attrs=attrs.float(), valid=(roughness < 0.15) & (dist < 0.25), hair=hair_cls)

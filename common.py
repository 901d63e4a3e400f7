"""Plumbing shared by the numbered scripts: CLI, seeding, devices, checkpoints, dataset readers,
toy data, grids, logging, metric backbones. Nothing a paper names lives here (networks, losses,
EMA, truncation, R1 ... stay in the scripts). The toy data generator and its oracle: data/toy.py."""
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import random
import re
import sys
import time
import typing
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2

from data.toy import (FACE_ATTRS, SHAPES, make_toy, read_faces,  # noqa: F401 (re-exported)
                      read_scenes, read_shapes)

ROOT = Path(__file__).resolve().parent


# ---- Errors: bad input is one line that names the file or flag and the fix, never a deep traceback
class UserError(Exception):
    pass


def require(cond, msg):
    if not cond:
        raise UserError(msg)


def main_guard(fn, argv=None):
    try:
        fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---- CLI from a config dataclass: one flag per field, help = the field's trailing comment
def parse_config(cfg_cls, presets, argv=None, doc="", modes=("train",), extra=()):
    """Returns (cfg, ns): defaults < preset < explicit flags. See /README.md for the conventions."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(modes) > 1:
        p.add_argument("mode", nargs="?", default=modes[0], choices=modes, help="what to do")
    p.add_argument("--preset", choices=sorted(presets),
                   help="named settings (default: from --data)")
    hints, comments = typing.get_type_hints(cfg_cls), {}
    for klass in reversed(cfg_cls.__mro__[:-1]):  # help text: the comment after each field
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # defined where there is no source file (e.g. a REPL)
            continue
        pairs = re.findall(r"^[ \t]+(\w+)[ \t]*:[^#\n]*#[ \t]*(.*)$", source, re.MULTILINE)
        comments.update((name, text.strip()) for name, text in pairs)
    fields = dataclasses.fields(cfg_cls)
    for f in fields:
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse
        seq = typing.get_origin(kind) in (tuple, list)
        kw = ({"action": argparse.BooleanOptionalAction} if kind is bool else
              {"nargs": "+", "type": typing.get_args(kind)[0]} if seq else {"type": kind})
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        p.add_argument(*flags, default=argparse.SUPPRESS, dest=f.name, help=text, **kw)
    for flags, kw in extra:
        p.add_argument(*flags, **kw)
    ns = p.parse_args(argv)
    ns.mode = getattr(ns, "mode", modes[0])
    given = {f.name: getattr(ns, f.name) for f in fields if hasattr(ns, f.name)}
    data = str(given.get("data", ""))
    if ns.preset is None:  # a --data folder named like a preset, else toy for the toy data
        guess, toy = Path(data.rstrip("/")).name, data in ("", "toy") and "toy" in presets
        ns.preset = guess if guess in presets else ("toy" if toy else None)
    values = {**presets.get(ns.preset, {}), **given}
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), ns


# ---- Seeding, device, precision
def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(not name.startswith("cuda") or torch.cuda.is_available(),
            f"--device {name}: no CUDA GPU is visible; use --device cpu (or auto)")
    return torch.device(name)


def autocast(device, enabled):
    """bf16 mixed precision on CUDA when enabled; the CPU always runs the faithful fp32 path."""
    cuda = enabled and torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


# ---- Run folder and checkpoints: one file holds the whole training state
def prepare_run(out, resume, overwrite):
    last = Path(out) / "last.pt"
    last.parent.mkdir(parents=True, exist_ok=True)
    if resume == "auto":
        return last if last.exists() else None
    if resume:
        require(Path(resume).is_file(), f"--resume {resume}: no such checkpoint file; "
                "use --resume auto to continue the run in --out, or leave it out to start fresh")
        return Path(resume)
    require(not last.exists() or overwrite, f"{last.parent} already holds a run ({last}); pass "
            "--resume auto to continue it, --overwrite to start over, or another --out")
    return None


def strip_prefixes(state_dict):
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def save_checkpoint(path, step, cfg, nets, opts, extra=None):
    """Atomic: a crash mid-write leaves the previous checkpoint intact, never a half-written one."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}
    state = {"step": step, "config": dataclasses.asdict(cfg), "rng": rng, "extra": extra or {},
             "nets": {k: strip_prefixes(m.state_dict()) for k, m in nets.items()},
             "opts": {k: o.state_dict() for k, o in opts.items()}}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, nets, opts=None, map_location="cpu", restore_rng=True):
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        for k, m in nets.items():
            m.load_state_dict(strip_prefixes(state["nets"][k]))
        for k, o in (opts or {}).items():
            o.load_state_dict(state["opts"][k])
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # unpickling, missing keys, shape mismatch: all mean a wrong file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a checkpoint of this script ({first[:200]})") from None
    if restore_rng:
        version, internal, gauss = state["rng"]["python"]  # setstate wants tuples, not lists
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def check_finite(losses, step, last_ckpt=None):
    for k, v in losses.items():
        if not abs(float(v)) < float("inf"):  # nan or ±inf
            raise UserError(f"step {step}: loss term '{k}' is {float(v)}; stopping. Last good "
                            f"checkpoint: {last_ckpt or 'none yet'} (try a lower lr, or --no-amp)")


# ---- Data: readers for the real on-disk formats (the toy sets use the same formats)
def resolve_data(data, kind, img_size):
    """'' / 'toy' -> the built-in toy set (written on first use); otherwise the folder, checked."""
    if data in ("", "toy"):
        return make_toy(kind, ROOT / "data" / "toy" / f"{kind}_{img_size}", img_size)
    path = Path(data)
    name = path.name if path.name in ("afhq", "celeba_hq", "celeba", "edges2shoes") else "afhq"
    require(path.is_dir(), f"--data {data}: no such folder; download a dataset with `python "
            f"data/download.py {name}`, or train on the built-in toy data with --data toy")
    return path


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-case, so .JPG and .PNG count too


def load_rgb(path):
    """Any PIL-readable image as 8-bit RGB (grey, palette, RGBA, 16-bit and CMYK are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the top 8 bits
                img = img.point(lambda v: v / 256).convert("L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white
            return img.convert("RGB")
    except Exception as e:  # a damaged file raises OSError, SyntaxError, ValueError, zlib.error...
        raise UserError(f"{path}: cannot read this image ({type(e).__name__}); "
                        "delete or replace it") from None


def to_tensor_norm():
    """PIL -> float tensor (3, H, W) in [-1, 1]."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.5] * 3, [0.5] * 3)])


def _images(folder, recursive=False, fix=""):
    files = Path(folder).rglob("*") if recursive else Path(folder).iterdir()
    imgs = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    require(imgs, f"{folder}: no images (.jpg/.jpeg/.png){fix}")
    return imgs


class _Files(Dataset):
    """Base of the readers below: one sample per file; a subclass defines _load(i).
    Skip-and-count: an unreadable file is named once and replaced by a readable file of its group
    (its domain; any file for the other readers), so a batch keeps its size and its labels.
    `skipped` (one flag per file) lives in shared memory, so DataLoader's worker processes (new
    ones every epoch in 03 and 04) and the main process keep one record: each file is named once
    per run, and n_skipped counts them all. (Decoding every file up front would name each once
    too, but costs minutes on 200k CelebA JPEGs before the first step.)"""
    def __init__(self, files, groups=None, folders=(), skipped=None):
        self.files, self.folders = files, folders  # folders: per group, named if none is readable
        self.groups = torch.tensor(groups or [0] * len(files))
        self.skipped = torch.zeros(len(files), dtype=torch.bool).share_memory_() \
            if skipped is None else skipped  # skipped: share another reader's (same files)

    def __len__(self):
        return len(self.files)

    @property
    def n_skipped(self):
        return int(self.skipped.sum())

    def __getitem__(self, i):
        while True:
            try:
                return self._load(i)
            except UserError as e:
                if not self.skipped[i]:  # two workers at the same moment could both warn: rare
                    self.skipped[i] = True
                    print(f"warning: skipping {e} ({self.n_skipped} skipped so far)",
                          file=sys.stderr, flush=True)
                i = self._replacement(i)

    def _replacement(self, i):
        group = self.groups == self.groups[i]
        left = (group & ~self.skipped).nonzero()[:, 0]
        first = self.files[int(group.nonzero()[0, 0])]
        require(len(left), f"{self.folders[int(self.groups[i])]}: none of its {int(group.sum())} "
                f"images is readable (e.g. {first}); replace them or remove the folder")
        return int(left[random.Random(int(i)).randrange(len(left))])  # own RNG: resume is exact


class DomainFolder(_Files):
    """root/<split>/<domain>/*.{jpg,jpeg,png}; label = index of the domain in sorted order."""
    def __init__(self, root, split="train", transform=None, skipped=None):
        folder, train = Path(root) / split, Path(root) / "train"
        require(folder.is_dir(), f"{folder}: missing; a domain dataset needs "
                f"{root}/{split}/<domain>/*.jpg (see data/README.md), or use --data toy")
        self.domains = sorted(d.name for d in folder.iterdir() if d.is_dir())
        require(len(self.domains) >= 2, f"{folder}: found {len(self.domains)} domain folder(s) "
                f"{self.domains}; translation needs at least 2 (one sub-folder per domain)")
        names = sorted(d.name for d in train.iterdir() if d.is_dir()) \
            if split != "train" and train.is_dir() else self.domains
        require(names == self.domains, f"{folder}: domain folders {self.domains} differ from "
                f"train/'s {names}; {split}/ needs the same ones (a label is the sorted index)")
        self.samples = [(p, y) for y, d in enumerate(self.domains)
                        for p in _images(folder / d, fix="; add some or remove the folder")]
        self.targets = [y for _, y in self.samples]
        super().__init__([p for p, _ in self.samples], self.targets,
                         [folder / d for d in self.domains], skipped)
        self.transform = transform or to_tensor_norm()

    def _load(self, i):
        return self.transform(load_rgb(self.files[i])), self.targets[i]


class ReferencePairs(DomainFolder):
    """Two different images of one domain (StarGAN v2's x_ref, x_ref2) and the domain label."""
    def __init__(self, root, split="train", transform=None, seed=0, skipped=None):
        super().__init__(root, split, transform, skipped)
        rng, self.partner = random.Random(seed), list(range(len(self.samples)))
        for y in range(len(self.domains)):  # fixed random partners, as official (random.sample)
            idx = [i for i, t in enumerate(self.targets) if t == y]
            rng.shuffle(idx)
            for a, b in zip(idx, idx[1:] + idx[:1]):  # a cycle: never the image itself
                self.partner[a] = b

    def __getitem__(self, i):
        x_ref, y = super().__getitem__(i)
        x_ref2, _ = super().__getitem__(self.partner[i])
        return x_ref, x_ref2, y


def read_attr_table(path):
    """CelebA attributes -> (names, rows [(file name, values as str)]) in file order. Official
    .txt: line 1 the number of images, line 2 the names, then `file.jpg 1 -1 ...`; Kaggle's .csv:
    `image_id,name,...` then `file.jpg,1,-1,...`. Strict: a wrong line is named, never shifted."""
    path, lines = Path(path), Path(path).read_text(encoding="utf-8-sig").splitlines()  # BOM
    csv, head = path.suffix == ".csv", 0 if path.suffix == ".csv" else 1
    split = (lambda ln: [t.strip() for t in ln.split(",")]) if csv else str.split
    fmt = ("line 1 'image_id,' + the attribute names, then one line 'file.jpg,1,-1,...' per image"
           if csv else "line 1 the number of images, line 2 the attribute names, then one line "
           "'file.jpg 1 -1 ...' per image (see data/README.md)")
    require(any(ln.strip() for ln in lines), f"{path}: empty; expected {fmt}")
    require(csv or lines[0].strip().isdigit(), f"{path} line 1: expected the number of images "
            f"(e.g. 202599), found '{lines[0][:30]}'; the format is {fmt}")
    names = split(lines[head]) if len(lines) > head else []
    file_col = names[:1] in (["image_id"], ["filename"], ["file"], ["image"])  # names its header
    names, rows = names[file_col:], []
    for n, line in enumerate(lines[head + 1:], head + 2):
        if line.strip():
            row = split(line)
            hint = f" (if '{names[0]}' heads the file names, call it image_id)" \
                if len(row) == len(names) and not rows else ""  # the first row: a header issue
            require(len(row) == len(names) + 1, f"{path} line {n}: {len(row) - 1} values after "
                    f"the file name, expected {len(names)}, one per name on line {head + 1}{hint}")
            if not {"1", "-1", "0"}.issuperset(row[1:]):
                v, a = next((v, a) for v, a in zip(row[1:], names) if v not in ("1", "-1", "0"))
                raise UserError(f"{path} line {n}: '{v}' under {a}; expected 1 or -1")
            rows.append((row[0], row[1:]))
    require(csv or int(lines[0]) == len(rows), f"{path} line 1 says {lines[0].strip()} images "
            f"but {len(rows)} rows follow; a cut-short download? Fetch it again, or fix the count")
    return names, rows


class CelebAAttrs(_Files):
    """CelebA: images/ (or img_align_celeba/) + list_attr_celeba.txt (or Kaggle's .csv); labels
    of the chosen attributes. Rows whose image is not in the folder are dropped, with a warning."""
    @staticmethod
    def table(root):
        files = [Path(root) / f"list_attr_celeba.{ext}" for ext in ("txt", "csv")]
        return next((f for f in files if f.is_file()), None)

    def __init__(self, root, attrs, split="train", transform=None):
        root, table = Path(root), self.table(root)
        images = [root / d for d in ("images", "img_align_celeba/img_align_celeba",
                                     "img_align_celeba") if (root / d).is_dir()]
        require(images and table, f"{root}: expected images/ and list_attr_celeba.txt (CelebA "
                "layout); get it with `python data/download.py celeba`")
        names, rows = read_attr_table(table)
        missing = [a for a in attrs if a not in names]
        require(not missing, f"--attrs: {missing} not in {table}; valid names: {' '.join(names)}")
        present = set(os.listdir(images[0]))  # one listing, not one stat per row
        absent = [r[0] for r in rows if r[0] not in present]
        require(len(absent) < len(rows), f"none of the {len(rows)} files listed in {table} is in "
                f"{images[0]} (e.g. {rows[0][0]}); put the images there (see data/README.md)")
        if absent and split == "train":  # once: it is about the file, not the split
            print(f"warning: {len(absent)} of the {len(rows)} files listed in {table} are not in "
                  f"{images[0]} (e.g. {absent[0]}); training without them", file=sys.stderr)
        random.Random(1234).shuffle(rows)  # official split: seeded shuffle, first 1999 rows test
        n_test = 1999 if len(rows) >= 20000 else max(1, len(rows) // 10)  # small files: a tenth
        rows = rows[:n_test] if split == "test" else rows[n_test:]
        require(any(r[0] in present for r in rows), f"{table}: none of the {split} split's "
                f"{len(rows)} rows has its image in {images[0]}; add the images (or rows)")
        rows = [r for r in rows if r[0] in present]
        cols = [names.index(a) for a in attrs]
        super().__init__([images[0] / r[0] for r in rows], folders=[images[0]])
        self.labels = torch.tensor([[float(r[1][c] == "1") for c in cols] for r in rows])  # (N, A)
        self.attr_names, self.transform = list(attrs), transform or to_tensor_norm()

    def _load(self, i):
        img = load_rgb(self.files[i])
        side = min(img.width, 178)  # official CenterCrop(178) of the 178×218 aligned faces
        return self.transform(v2.functional.center_crop(img, [side, side])), self.labels[i]


class AlignedPairs(_Files):
    """pix2pix format: root/<split>/*.jpg, each file A|B side by side."""
    def __init__(self, root, split="train", transform=None):
        folder = Path(root) / split
        require(folder.is_dir(), f"{folder}: missing; aligned pairs need {root}/{split}/*.jpg "
                "(A|B side by side), e.g. `python data/download.py edges2shoes`")
        super().__init__(_images(folder), folders=[folder])
        norm = to_tensor_norm()
        self.transform = transform or (lambda a, b: (norm(a), norm(b)))

    def _load(self, i):
        img = load_rgb(self.files[i])
        w = img.width // 2
        return self.transform(img.crop((0, 0, w, img.height)), img.crop((w, 0, 2 * w, img.height)))


class ImageFiles(_Files):
    """Every image below root (recursively), no labels: unconditional GAN training."""
    def __init__(self, root, transform=None):
        super().__init__(_images(root, recursive=True, fix=" found below this folder"),
                         folders=[Path(root)])
        self.transform = transform or to_tensor_norm()

    def _load(self, i):
        return self.transform(load_rgb(self.files[i]))


class _Loader(DataLoader):
    """A DataLoader whose worker errors stay one line: DataLoader re-raises a worker's UserError
    with the worker's whole traceback as the message; keep the original message only."""
    def __iter__(self):
        it = super().__iter__()
        try:
            yield from it
        except UserError as e:
            caught, _, msg = str(e).rpartition("UserError: ")
            # Stop the workers now: left to the garbage collector, that waits 5 s per worker.
            getattr(it, "_shutdown_workers", lambda: None)()
            raise UserError(msg.strip() if caught.startswith("Caught UserError") else str(e)) \
                from None


def make_loader(dataset, batch_size, shuffle=True, balanced=False, num_workers=0, device=None,
                seed=0, drop_last=True):
    require(not drop_last or len(dataset) >= batch_size, f"--batch {batch_size}: the dataset has "
            f"only {len(dataset)} images; lower --batch or add images")
    g, sampler = torch.Generator().manual_seed(seed), None
    if balanced:  # every domain equally often, whatever its size: each image weighs 1/count
        y = torch.tensor(dataset.targets)
        weights = (1.0 / torch.bincount(y).float())[y]
        sampler, shuffle = WeightedRandomSampler(weights, len(weights), generator=g), False
    return _Loader(dataset, batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                   generator=g, num_workers=num_workers, persistent_workers=num_workers > 0,
                   pin_memory=device is not None and torch.device(device).type == "cuda")


def infinite(loader):
    while True:
        yield from loader


# ---- Output: grids, GIFs, console and JSONL logging
def save_grid(images, path, nrow):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    if images.shape[-1] < 32:  # tiny toy images: 4x nearest-neighbour, so a viewer shows pixels
        images = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    torchvision.utils.save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1),
                                 padding=1)


def save_gif(frames, path, duration_ms=100):
    """frames: list of (3, H, W) in [-1, 1] -> an animated GIF that loops forever."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    u8 = [((f.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte() for f in frames]
    pil = [v2.functional.to_pil_image(u).convert("P", palette=Image.Palette.ADAPTIVE) for u in u8]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)


class Logger:
    """Console line every `every` steps plus one JSON line per logged step in out/log.jsonl."""
    def __init__(self, out, total, every):
        self.path, self.total, self.every, self.step0 = Path(out) / "log.jsonl", total, every, None

    def log(self, step, losses):
        if self.step0 is None:  # the first call starts the clock (call it at the first step)
            self.step0, self.t0 = step, time.time()
        vals = {k: float(v) for k, v in losses.items()}  # the only host sync of a training step
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - step) / rate)) if rate else "-"
        terms = " ".join(f"{k} {v:.4g}" for k, v in vals.items())
        print(f"step {step}/{self.total} | {rate:.2f} it/s | ETA {eta} | {terms}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **vals}) + "\n")


# ---- Metric backbones (FID: torchvision Inception-v3; LPIPS v0.1 on AlexNet or VGG16)
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

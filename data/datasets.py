"""The data side of the numbered scripts: readers for the real on-disk formats (the toy sets use
the same formats) and the step samplers that make training data a pure function of (seed, step,
rank). Depends on common (errors, the distributed helpers); common never imports this module."""
import itertools
import os
import random
import signal
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common import STOP_SIGNALS, SharedError, UserError, rank, require, world_size
from data.toy import make_toy

ROOT = Path(__file__).resolve().parent.parent  # the repository: the toy sets live in data/toy/


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


def load_rgb_files(src, flag="--src"):
    """An image file, or a folder of images (recursively) -> [(path, RGB image)]. An unreadable
    file in a folder is named and skipped, as in training; none readable: one line."""
    path = Path(src)
    require(path.exists(), f"{flag} {src}: not found; pass an image file or a folder of images")
    if path.is_file():
        return [(path, load_rgb(path))]
    files, images = ImageFiles(path).files, []
    for f in files:
        try:
            images.append((f, load_rgb(f)))
        except UserError as e:
            print(f"warning: skipping {e}", file=sys.stderr, flush=True)
    require(images, f"{flag} {src}: none of its {len(files)} image(s) is readable (see above)")
    return images


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
    with the worker's whole traceback as the message; keep the original message only. Its workers
    ignore the stop signals: a cluster signals every process, and a worker killed by one makes
    DataLoader raise in the main process, even while it saves; the main process stops them."""
    def __init__(self, *a, **kw):
        super().__init__(*a, worker_init_fn=_ignore_stop_signals, **kw)

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


def _ignore_stop_signals(worker_id):
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, batch_size, shuffle=True, num_workers=0, device=None, seed=0,
                drop_last=True):
    """Fixed batches, eval and 01's classifier; training batches come from step_loader."""
    require(not drop_last or len(dataset) >= batch_size, f"--batch {batch_size}: the dataset has "
            f"only {len(dataset)} images; lower --batch or add images")
    return _Loader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last,
                   generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                   persistent_workers=num_workers > 0,
                   pin_memory=device is not None and torch.device(device).type == "cuda")


def infinite(loader):
    while True:
        yield from loader


# Training data: a pure function of (seed, step, rank), so a resumed run reads exactly what it would
# have read, and N processes × batch read what one process × N·batch reads (same global batch).
def check_batch(n, batch):
    """-> the global batch N × batch, or the one-line error when n images cannot fill it."""
    world, glob = world_size(), world_size() * batch
    if world > 1 and n < world:
        raise SharedError(f"{world} processes cannot share {n} image(s): each needs its own rows "
                          "of every batch; run fewer processes (torchrun --nproc_per_node) or add "
                          "images")
    if n < glob:
        raise SharedError(f"--batch {batch}: the dataset has only {n} images; lower --batch or "
                          "add images" if world == 1 else f"--batch {batch} × {world} processes "
                          f"= a global batch of {glob}, but the dataset has only {n} images; "
                          "lower --batch, run fewer processes, or add images")
    return glob


def epoch_rows(n, batch):
    """For a per-epoch shuffle of n images (03, 04) -> (steps per epoch, this process's positions
    in the epoch's order: its `batch` rows of each global batch, step after step)."""
    per_epoch = n // check_batch(n, batch)
    return per_epoch, torch.arange(per_epoch * world_size() * batch).view(
        per_epoch, world_size(), batch)[:, rank()].flatten()


class StepSampler(torch.utils.data.Sampler):
    """Endless batches of (index, key) for steps step, step + 1, ...: this process's rows of each
    global batch. Without weights: a shuffle per epoch (each image once, the tail dropped); with
    weights: draws with replacement ∝ weights. key seeds the sample's random transforms (_Keyed):
    flips and crops are then the same at any N, with or without loader workers."""
    def __init__(self, n, batch, seed=0, step=0, weights=None, name=""):
        self.n, self.step, self.weights, self.glob = n, step, weights, check_batch(n, batch)
        self.rows = slice(rank() * batch, (rank() + 1) * batch)
        # Random(str) hashes the text with SHA-512: stable seeds, distinct per stream (name)
        self.base, self.epoch_base = (random.Random(f"{seed}/{name}/{what}").getrandbits(32)
                                      for what in ("step", "epoch"))
        self.epoch = (None, None)  # (epoch, its order): one shuffle per epoch

    def global_batch(self, step):
        """-> indices and keys (N·batch,) of step's global batch."""
        g = torch.Generator().manual_seed((self.base + step) % 2**32)  # torch keeps 32 bits
        if self.weights is None:
            epoch, pos = divmod(step, self.n // self.glob)
            if self.epoch[0] != epoch:
                gen = torch.Generator().manual_seed((self.epoch_base + epoch) % 2**32)
                self.epoch = (epoch, torch.randperm(self.n, generator=gen))
            idx = self.epoch[1][pos * self.glob:(pos + 1) * self.glob]
        else:
            idx = torch.multinomial(self.weights, self.glob, replacement=True, generator=g)
        return idx, torch.randint(2**62, (self.glob,), generator=g)

    def __iter__(self):
        for step in itertools.count(self.step):
            idx, keys = self.global_batch(step)
            yield list(zip(idx[self.rows].tolist(), keys[self.rows].tolist()))


class _Keyed(Dataset):
    """dataset[i] with torch's RNG seeded by key during the call (restored after), so a sample's
    random transforms depend on its place in the run only, not on the process or worker."""
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, key = item
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed every GPU's generator,
            # which fork_rng(devices=[]) does not restore, and the ranks' draws would part ways.
            torch.default_generator.manual_seed(key)
            return self.dataset[i]


def step_loader(dataset, batch, seed, step=0, balanced=False, num_workers=0, device=None,
                name=""):
    """Endless training batches of this process from `step` on (StepSampler); balanced: every
    domain (dataset.targets) equally often, whatever its size (each image weighs 1/count).
    Streams drawn side by side need distinct names, or they draw the same indices."""
    weights = None
    if balanced:
        y = torch.tensor(dataset.targets)
        weights = (1.0 / torch.bincount(y).float())[y]
    return iter(_Loader(_Keyed(dataset), batch_sampler=StepSampler(
        len(dataset), batch, seed, step, weights, name), num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # else it draws from the global RNG
        pin_memory=device is not None and torch.device(device).type == "cuda"))

"""Download a dataset or pretrained checkpoint from its official source (see data/README.md).

    python data/download.py NAME [--root data] [--url URL] [--force]      (NAME: see --help)

Streams to <archive>.part with a progress line, resumes a partial file (HTTP Range), checks the
size (no source publishes a checksum), extracts safely, fixes the folder layout, deletes the
archive and prints the command to run next. A failure is one line "error: ..." saying what to
do, exit code 2. Standard library only (`weights` goes through common.py, so it needs torch).
"""
import argparse
import errno
import hashlib
import http.client
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import namedtuple
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DROPBOX = "https://www.dropbox.com/s/"  # dl=1 asks Dropbox for the file, not its preview page


Item = namedtuple("Item", "url kind needs command")  # kind: zip, tar (.tar.gz) or file (as is)
# A "file" item with several files has one URL per file (--url then names a folder holding them).
V2 = "python 02_stargan_v2.py --data {dest}"
V2_CKPT = ("python 02_stargan_v2.py sample --preset {} --official-ckpt "
           "{{dest}}/100000_nets_ema.ckpt --src <image>")
V1_CKPT = "python 01_stargan_v1.py sample --ckpt {dest}/200000-G.ckpt --src <image>"
ITEMS = {  # name: where from, archive kind, paths the final folder must hold, what to run next
    "celeba": Item(DROPBOX + "d1kjpkqklf0uw77/celeba.zip?dl=1", "zip",
                   ("images", "list_attr_celeba.txt"), "python 01_stargan_v1.py --data {dest}"),
    "afhq": Item(DROPBOX + "t9l9o3vsx2jai3z/afhq.zip?dl=1", "zip", ("train", "val"), V2),
    "afhq_v2": Item(DROPBOX + "vkzjokiwof5h8w6/afhq_v2.zip?dl=1", "zip", ("train", "val"),
                    V2 + " --preset afhq"),
    "celeba_hq": Item(DROPBOX + "f7pvjij2xlpff59/celeba_hq.zip?dl=1", "zip", ("train", "val"), V2),
    "edges2shoes": Item("http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/edges2shoes.tar.gz",
                        "tar", ("train", "val"), "python 03_bicyclegan_latent.py --data {dest}"),
    "stargan_v2_afhq": Item(DROPBOX + "etwm810v25h42sn/100000_nets_ema.ckpt?dl=1", "file",
                            ("100000_nets_ema.ckpt",), V2_CKPT.format("afhq")),
    "stargan_v2_celeba_hq": Item(DROPBOX + "96fmei6c93o8b8t/100000_nets_ema.ckpt?dl=1", "file",
                                 ("100000_nets_ema.ckpt",), V2_CKPT.format("celeba_hq")),
    "wing": Item((DROPBOX + "tjxpypwpt38926e/wing.ckpt?dl=1",
                  DROPBOX + "91fth49gyb7xksk/celeba_lm_mean.npz?dl=1"), "file",
                 ("wing.ckpt", "celeba_lm_mean.npz"),
                 "python 02_stargan_v2.py --data data/celeba_hq   # face masks for w_hpf > 0"),
    "stargan_v1_celeba_128": Item(DROPBOX + "7e966qq0nlxwte4/celeba-128x128-5attrs.zip?dl=1",
                                  "zip", ("200000-G.ckpt", "200000-D.ckpt"), V1_CKPT),
    "stargan_v1_celeba_256": Item(DROPBOX + "zdq6roqf63m0v5f/celeba-256x256-5attrs.zip?dl=1",
                                  "zip", ("200000-G.ckpt", "200000-D.ckpt"),
                                  V1_CKPT.replace("--src", "--img-size 256 --src")),
}
SHA256 = {}  # name: hex digest. None of these sources publishes one, so only sizes are checked.
# Folder names fixed after extraction: AFHQ v2 ships train/ + test/ (readers want val/), and a
# raw CelebA download calls the image folder img_align_celeba/.
RENAMES = (("test", "val"), ("img_align_celeba", "images"))


class Failure(Exception):
    """One-line message naming what failed and what to do; main() prints it and exits 2."""


def progress(done, total, start, t0):
    """One console line, rewritten in place: bytes, percent, speed."""
    pct = f"{100 * done / total:5.1f}%" if total else "?%"
    tot = f"{total / 1e6:.1f}" if total else "?"
    rate = (done - start) / 1e6 / max(time.time() - t0, 1e-6)
    print(f"\r  {done / 1e6:.1f}/{tot} MB {pct} {rate:.1f} MB/s ", end="", flush=True)


def fetch(url, part, chunk=1 << 20):
    """Stream `url` into `part`, resuming from its length: HTTP(S) asks for the missing bytes with
    a Range header; a 206 answer is appended, a 200 (Range ignored) or file:// starts over."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "stargan-edu-download"})
    if have and url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=60) as resp:
        if "text/html" in resp.headers.get("Content-Type", ""):  # e.g. a dead or throttled link
            raise Failure(f"{url} sent a web page, not the file (moved or rate-limited?): get it "
                          f"in a browser, save it as {part.with_suffix('')} and rerun")
        resumed = have > 0 and getattr(resp, "status", None) == 206
        have = have if resumed else 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        if resumed:
            print(f"  resuming {part.name} at {have / 1e6:.1f} MB")
        done = have
        t0 = shown = time.time()
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while block := resp.read(chunk):
                    f.write(block)
                    done += len(block)
                    if time.time() - shown > 0.2:
                        shown = time.time()
                        progress(done, total, have, t0)
        finally:
            progress(done, total, have, t0)
            print()  # end the progress line, also when the download fails
    size = part.stat().st_size
    if total is None:
        print(f"  {size} bytes; the server announced no size, so it was not checked")
    elif size != total:
        raise Failure(f"download of {url} stopped at {size} of {total} bytes: "
                      f"rerun the same command to resume from {part}")
    else:
        print(f"  {size} bytes, the size the server announced")
    return size


def verify(path, sha256):
    """Check a published sha256; without one, say that only the size was checked."""
    if not sha256:
        return print("  no published checksum for this file: only its size was checked")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != sha256:
        path.unlink()
        raise Failure(f"{path} has the wrong sha256 ({digest.hexdigest()}); it was deleted: rerun")


def safe_members(names, target, archive):
    """Raise unless every member name stays inside `target` (no zip-slip / tar-slip)."""
    root = target.resolve()
    for name in names:
        if not (root / name).resolve().is_relative_to(root):
            raise Failure(f"archive {archive} has a member escaping the target folder ({name!r}); "
                          "refusing to extract: delete it and download from the official URL")


def extract(archive, kind, target):
    """Extract a zip or tar.gz into `target`, refusing unsafe members."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as z:
                safe_members(z.namelist(), target, archive)
                z.extractall(target)
        else:
            with tarfile.open(archive, "r:*") as t:
                members = t.getmembers()
                safe_members([m.name for m in members], target, archive)
                odd = [m.name for m in members if not (m.isfile() or m.isdir())]
                if odd:  # links and devices could point outside target: a dataset needs none
                    raise Failure(f"archive {archive} has a link or device member ({odd[0]!r}); "
                                  "refusing to extract: delete it and download it again")
                t.extractall(target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise Failure(f"bad archive {archive} ({e}): delete it and rerun to download again")


def find_root(top, item):
    """The folder under `top` (breadth-first) that holds item.needs, after RENAMES."""
    queue = [top]
    while queue:
        folder = queue.pop(0)
        for old, new in RENAMES:
            if (folder / old).is_dir() and not (folder / new).exists():
                print(f"  renaming {old}/ -> {new}/")
                (folder / old).rename(folder / new)
        if all((folder / n).exists() for n in item.needs):
            return folder
        queue += sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX")
    raise Failure(f"the downloaded archive has no folder containing {', '.join(item.needs)}; "
                  "download it manually and arrange it as data/README.md shows")


def install(name, item, root, url, force):
    """Download + verify + extract + fix layout for one item. Returns the final folder."""
    dest = root / ("checkpoints/" + name if item.kind == "file" or name.startswith("stargan")
                   else name)
    if not force and all((dest / n).exists() for n in item.needs):
        print(f"{name} is already present at {dest} (pass --force to download it again)")
        return dest
    if item.kind == "file" and len(item.needs) > 1:  # one download per file, in order
        urls = url if isinstance(url, tuple) else [f"{url.rstrip('/')}/{n}" for n in item.needs]
        for u, n in zip(urls, item.needs):
            if force or not (dest / n).exists():
                install(name, item._replace(needs=(n,)), root, u, force)
        return dest
    filename = item.needs[0] if item.kind == "file" else name + (".zip" if item.kind == "zip"
                                                                 else ".tar.gz")
    archive = (dest if item.kind == "file" else root) / filename
    part = archive.with_name(archive.name + ".part")
    archive.parent.mkdir(parents=True, exist_ok=True)
    if force:
        archive.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if item.kind != "file" and dest.exists() and any(dest.iterdir()) and not force:
        missing = [n for n in item.needs if not (dest / n).exists()]
        raise Failure(f"{dest} exists but lacks {', '.join(missing)}: move it away or pass --force")
    manual = f"download {name} manually from {url} and put it at {archive}, then rerun"
    try:
        if archive.exists():
            print(f"using {archive} from an earlier run")
        else:
            print(f"downloading {name} from {url}")
            fetch(url, part)
            verify(part, SHA256.get(name, ""))
            part.replace(archive)
        if item.kind == "file":
            return dest
        stage = root / f".{name}.extract"
        shutil.rmtree(stage, ignore_errors=True)
        print(f"extracting {archive} ...")
        extract(archive, item.kind, stage)
        found = find_root(stage, item)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        found.replace(dest)
        shutil.rmtree(stage, ignore_errors=True)
        archive.unlink()  # only now: a failed extraction keeps the archive for a rerun
        return dest
    except urllib.error.HTTPError as e:
        if e.code == 416:  # "range not satisfiable": the partial file does not fit this server's
            part.unlink(missing_ok=True)
            raise Failure(f"{part} did not match the file on the server; it was deleted: rerun")
        raise Failure(f"HTTP {e.code} ({e.reason}) for {url}: {manual}")
    except urllib.error.URLError as e:
        raise Failure(f"could not fetch {url} ({e.reason}): {manual}")
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise Failure(f"download of {name} interrupted ({e}): rerun to resume from {part}")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise Failure(f"disk full while writing under {root}: free space (or pass --root on "
                          "another disk) and rerun; a partial download resumes")
        raise Failure(f"{name}: {e}: {manual}")


def fetch_weights():
    """Metric backbones (Inception-v3, LPIPS alex/vgg) into the torch hub cache (data/metrics.py)."""
    sys.path.insert(0, str(REPO))
    try:
        import torch
        from data.metrics import LPIPS, InceptionPool
        InceptionPool(pretrained=True)
        LPIPS("alex")
        LPIPS("vgg")
    except Exception as e:  # offline, hub error, ...: keep it to one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Failure(f"fetching the metric weights failed ({msg}); check the network and rerun")
    print(f"metric weights are in the torch hub cache {torch.hub.get_dir()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(ITEMS) + ["weights"], help="what to download")
    parser.add_argument("--root", default="data", help="folder that receives data/<name>")
    parser.add_argument("--url", default="", help="override the official URL (a mirror, file://;"
                        " for wing: the folder holding both files)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    ns = parser.parse_args(argv)
    if ns.url and urllib.parse.urlsplit(ns.url).scheme not in ("http", "https", "ftp", "file"):
        print(f"error: --url {ns.url}: not a URL; pass http(s)://... or file:///path/to/archive",
              file=sys.stderr)  # urllib would raise a bare ValueError
        return 2
    try:
        if ns.name == "weights":
            fetch_weights()
            return 0
        item = ITEMS[ns.name]
        dest = install(ns.name, item, Path(ns.root), ns.url or item.url, ns.force)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume the download", file=sys.stderr)
        return 2
    except Failure as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
        return 2
    print(f"done: {dest}\nnext: {item.command.format(dest=dest.as_posix())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""data/download.py without the network: file:// URLs and a local HTTP server on 127.0.0.1."""
import importlib.util
import io
import subprocess
import sys
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "data" / "download.py"
spec = importlib.util.spec_from_file_location("download", SCRIPT)
download = importlib.util.module_from_spec(spec)
spec.loader.exec_module(download)


def make_zip(path, members):
    """members: {name inside the archive: bytes}."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def make_tar(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def run(argv, capsys):
    rc = download.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


AFHQ = {f"afhq/{s}/{d}/{i}.jpg": b"img" for s in ("train", "val")
        for d in ("cat", "dog", "wild") for i in range(2)}


def test_zip_from_file_url_gives_layout_removes_archive_prints_command(tmp_path, capsys):
    url = make_zip(tmp_path / "src.zip", AFHQ).as_uri()
    root = tmp_path / "data"
    rc, out, err = run(["afhq", "--root", str(root), "--url", url], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (root / "afhq" / "train").iterdir()) == ["cat", "dog", "wild"]
    assert len(list((root / "afhq").rglob("*.jpg"))) == 12
    assert not (root / "afhq.zip").exists() and not (root / "afhq.zip.part").exists()
    assert not (root / ".afhq.extract").exists()
    assert f"python 02_stargan_v2.py --data {(root / 'afhq').as_posix()}" in out
    assert "no published checksum" in out
    # Already present: no download (the URL is gone now), says so, prints the command again.
    (tmp_path / "src.zip").unlink()
    rc, out, _ = run(["afhq", "--root", str(root), "--url", url], capsys)
    assert rc == 0 and "already present" in out and "python 02_stargan_v2.py" in out
    # --force downloads again, so now the missing URL is an error.
    rc, _, err = run(["afhq", "--root", str(root), "--url", url, "--force"], capsys)
    assert rc == 2 and "manually" in err


def test_layout_fixes_celeba_nested_and_afhq_v2_test_split(tmp_path, capsys):
    root = tmp_path / "data"
    celeba = {"celeba/images/000001.jpg": b"a", "celeba/list_attr_celeba.txt": b"1\n"}
    url = make_zip(tmp_path / "c.zip", celeba).as_uri()
    assert run(["celeba", "--root", str(root), "--url", url], capsys)[0] == 0
    assert (root / "celeba/images/000001.jpg").is_file()
    assert (root / "celeba/list_attr_celeba.txt").is_file()
    # AFHQ v2 ships train/ and test/ at the top of the zip; the readers want <root>/{train,val}.
    v2 = {f"{s}/{d}/0.png": b"p" for s in ("train", "test") for d in ("cat", "dog", "wild")}
    url = make_zip(tmp_path / "v2.zip", v2).as_uri()
    rc, out, _ = run(["afhq_v2", "--root", str(root), "--url", url], capsys)
    assert rc == 0 and (root / "afhq_v2/val/wild/0.png").is_file()
    assert not (root / "afhq_v2/test").exists()


def test_tar_gz_and_pretrained_file(tmp_path, capsys):
    root = tmp_path / "data"
    pairs = {f"edges2shoes/{s}/{i}_AB.jpg": b"ab" for s in ("train", "val") for i in range(3)}
    url = make_tar(tmp_path / "e.tar.gz", pairs).as_uri()
    rc, out, _ = run(["edges2shoes", "--root", str(root), "--url", url], capsys)
    assert rc == 0 and len(list((root / "edges2shoes/val").glob("*.jpg"))) == 3
    assert not (root / "edges2shoes.tar.gz").exists()
    assert "python 03_bicyclegan_latent.py --data" in out
    (tmp_path / "nets.ckpt").write_bytes(b"weights")
    url = (tmp_path / "nets.ckpt").as_uri()
    rc, out, _ = run(["stargan_v2_afhq", "--root", str(root), "--url", url], capsys)
    ckpt = root / "checkpoints/stargan_v2_afhq/100000_nets_ema.ckpt"
    assert rc == 0 and ckpt.read_bytes() == b"weights"
    assert list(ckpt.parent.iterdir()) == [ckpt]  # no .part left behind
    assert f"--preset afhq --official-ckpt {ckpt.as_posix()}" in out
    # StarGAN v1's pretrained zip holds the two files at its top level.
    url = make_zip(tmp_path / "v1.zip", {"200000-G.ckpt": b"G", "200000-D.ckpt": b"D"}).as_uri()
    rc, out, _ = run(["stargan_v1_celeba_256", "--root", str(root), "--url", url], capsys)
    folder = root / "checkpoints/stargan_v1_celeba_256"
    assert rc == 0
    assert sorted(p.name for p in folder.iterdir()) == ["200000-D.ckpt", "200000-G.ckpt"]
    assert f"--ckpt {(folder / '200000-G.ckpt').as_posix()} --img-size 256" in out
    assert not (root / "stargan_v1_celeba_256.zip").exists()


def test_wing_fetches_both_files_into_checkpoints(tmp_path, capsys):
    mirror, root = tmp_path / "mirror", tmp_path / "data"
    mirror.mkdir()
    (mirror / "wing.ckpt").write_bytes(b"fan")
    (mirror / "celeba_lm_mean.npz").write_bytes(b"landmarks")
    rc, out, err = run(["wing", "--root", str(root), "--url", mirror.as_uri()], capsys)
    folder = root / "checkpoints/wing"
    assert rc == 0, err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == \
        {"wing.ckpt": b"fan", "celeba_lm_mean.npz": b"landmarks"}
    assert "python 02_stargan_v2.py --data data/celeba_hq" in out
    assert [u.split("/")[-1] for u in download.ITEMS["wing"].url] == \
        ["wing.ckpt?dl=1", "celeba_lm_mean.npz?dl=1"]  # the official files, in `needs` order
    (folder / "celeba_lm_mean.npz").unlink()  # one missing: only that one is fetched again
    (mirror / "wing.ckpt").unlink()
    rc, out, err = run(["wing", "--root", str(root), "--url", mirror.as_uri()], capsys)
    assert rc == 0 and (folder / "celeba_lm_mean.npz").read_bytes() == b"landmarks"


class Server(BaseHTTPRequestHandler):
    """Serves `payload` at /f. Honours Range unless told not to; can cut the first answer short."""
    payload, honour_range, cut_first, ranges = b"", True, False, []

    def do_GET(self):
        if self.path != "/f":
            return self.send_error(404)
        cls = type(self)
        rng = self.headers.get("Range")
        cls.ranges.append(rng)
        start = int(rng[6:-1]) if rng and cls.honour_range else 0
        if start >= len(cls.payload) > 0:
            return self.send_error(416)
        body = cls.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(cls.payload) - 1}/"
                                              f"{len(cls.payload)}")
        self.end_headers()
        if cls.cut_first:  # announce everything, send a third, hang up: an interrupted download
            cls.cut_first = False
            body = body[: len(body) // 3]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def serve(payload, honour_range=True, cut_first=False):
    Server.payload, Server.honour_range, Server.cut_first, Server.ranges = (
        payload, honour_range, cut_first, [])
    server = HTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("honour_range", [True, False])
def test_fetch_resumes_partial_file_with_range(tmp_path, honour_range):
    payload = bytes(range(256)) * 1000
    part = tmp_path / "x.part"
    part.write_bytes(payload[:100_000])
    with serve(payload, honour_range) as base:
        assert download.fetch(base + "/f", part, chunk=8192) == len(payload)
    assert Server.ranges == ["bytes=100000-"]
    assert part.read_bytes() == payload  # appended on 206, rewritten from 0 on 200


def test_interrupted_download_fails_then_resumes(tmp_path, capsys):
    payload = bytes(range(256)) * 500
    url_args = ["stargan_v2_celeba_hq", "--root", str(tmp_path)]
    part = tmp_path / "checkpoints/stargan_v2_celeba_hq/100000_nets_ema.ckpt.part"
    with serve(payload, cut_first=True) as base:
        rc, _, err = run(url_args + ["--url", base + "/f"], capsys)
        assert rc == 2 and "resume" in err and len(err.strip().splitlines()) == 1
        assert 0 < part.stat().st_size < len(payload)
        rc, out, err = run(url_args + ["--url", base + "/f"], capsys)
    assert rc == 0, err
    assert Server.ranges[1] == f"bytes={len(payload) // 3}-" and "resuming" in out
    assert part.with_suffix("").read_bytes() == payload and not part.exists()


def test_http_404_and_416_are_one_line_errors(tmp_path, capsys):
    with serve(b"0123456789") as base:
        rc, _, err = run(["afhq", "--root", str(tmp_path), "--url", base + "/gone"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1
        assert "HTTP 404" in err and f"put it at {tmp_path / 'afhq.zip'}" in err
        part = tmp_path / "afhq.zip.part"
        part.write_bytes(b"x" * 20)  # longer than the file: the server cannot satisfy the Range
        rc, _, err = run(["afhq", "--root", str(tmp_path), "--url", base + "/f"], capsys)
    assert rc == 2 and "did not match" in err and not part.exists()


def test_missing_file_url_cli_exits_2_with_one_line(tmp_path):
    url = (tmp_path / "nope.zip").as_uri()
    proc = subprocess.run([sys.executable, str(SCRIPT), "celeba", "--root", str(tmp_path / "d"),
                           "--url", url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"download celeba manually from {url}" in lines[0]
    assert str(tmp_path / "d" / "celeba.zip") in lines[0] and "then rerun" in lines[0]


@pytest.mark.parametrize("maker,name", [(make_zip, "afhq"), (make_tar, "edges2shoes")])
def test_member_escaping_target_is_rejected(tmp_path, capsys, maker, name):
    members = {f"{name}/train/a/0.jpg": b"x", f"{name}/val/a/0.jpg": b"x", "../evil.txt": b"!"}
    url = maker(tmp_path / "bad", members).as_uri()
    root = tmp_path / "data"
    rc, _, err = run([name, "--root", str(root), "--url", url], capsys)
    assert rc == 2 and "escaping" in err and "../evil.txt" in err
    assert not (root / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (root / name).exists()


def test_bad_archive_and_checksum_and_incomplete_folder(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    url = (tmp_path / "junk.zip").as_uri()
    rc, _, err = run(["afhq", "--root", str(root), "--url", url], capsys)
    assert rc == 2 and "bad archive" in err
    assert (root / "afhq.zip").exists()  # kept: extraction failed, the message says to delete it
    monkeypatch.setitem(download.SHA256, "celeba_hq", "0" * 64)
    rc, _, err = run(["celeba_hq", "--root", str(root), "--url", url], capsys)
    assert rc == 2 and "wrong sha256" in err and not list(root.glob("celeba_hq.zip*"))
    (tmp_path / "page.html").write_text("<html>Too many requests</html>")
    rc, _, err = run(["afhq_v2", "--root", str(root), "--url", (tmp_path / "page.html").as_uri()],
                     capsys)
    assert rc == 2 and "web page" in err and str(root / "afhq_v2.zip") in err
    (root / "celeba").mkdir()
    (root / "celeba" / "notes.txt").write_text("mine")
    rc, _, err = run(["celeba", "--root", str(root), "--url", url], capsys)
    assert rc == 2 and "lacks images, list_attr_celeba.txt" in err
    assert (root / "celeba" / "notes.txt").exists()  # never deleted without --force


def test_url_that_is_not_a_url_is_a_one_line_error(tmp_path, capsys):
    rc, _, err = run(["afhq", "--root", str(tmp_path), "--url", "notaurl"], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        "error: --url notaurl: not a URL; pass http(s)://... or file:///path/to/archive"]
    assert not any(tmp_path.iterdir())  # refused before anything is written

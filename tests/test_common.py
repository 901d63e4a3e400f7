"""common.py, data/datasets.py, data/toy.py: readers, checkpoints, CLI, toy data, oracle."""
import dataclasses
import errno
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import common
from common import UserError
from conftest import ROOT, write_unreadable
from data import datasets, metrics, toy


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    toy.write_shapes(root, 32, n_train=12, n_val=3, seed=0)
    return root


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    toy.write_faces(root, 48, n=60, seed=0)
    return root


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------
def test_domain_folder_shapes_and_labels(shapes):
    ds = datasets.DomainFolder(shapes, "train")
    assert ds.domains == ["circle", "square", "triangle"]
    assert len(ds) == 36 and ds.targets.count(1) == 12
    x, y = ds[13]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    assert -1 <= x.min() < x.max() <= 1
    assert ds.samples[13][0].parent.name == "square"


def test_reference_pairs_same_domain_different_files(shapes):
    ds = datasets.ReferencePairs(shapes, "train", seed=3)
    for i in range(len(ds)):
        j = ds.partner[i]
        assert i != j and ds.targets[i] == ds.targets[j]
    other = datasets.ReferencePairs(shapes, "train", seed=4).partner  # random partners, seeded
    assert other != ds.partner and other == datasets.ReferencePairs(shapes, "train", seed=4).partner
    x_ref, x_ref2, y = ds[20]
    assert x_ref.shape == x_ref2.shape == (3, 32, 32) and not torch.equal(x_ref, x_ref2)
    assert y == ds.targets[20]


def test_balanced_loader_draws_domains_equally(tmp_path):
    toy.write_shapes(tmp_path, 32, n_train=0, n_val=0)
    for shape, n in zip(toy.SHAPES, (40, 4, 4)):  # an unbalanced set: 40 circles, 4 + 4 others
        toy_dir = tmp_path / "train" / shape
        rng = random.Random(n)
        for i in range(n):
            img = toy._u8(toy.render_shape(shape, 32, rng)[0])
            Image.frombytes("RGB", (32, 32), bytes(img.permute(1, 2, 0).flatten().tolist())).save(
                toy_dir / f"{i}.png")
    ds = datasets.DomainFolder(tmp_path)
    batches = datasets.step_loader(ds, 8, seed=0, balanced=True)  # what 02 trains with
    ys = torch.cat([y for _, (x, y) in zip(range(30), batches)])
    share = torch.bincount(ys, minlength=3).float() / len(ys)
    assert share.min() > 0.25, share  # unbalanced sampling would give circles 83 %


def test_celeba_attrs_parsing_and_split(faces):
    attrs = ["Male", "Blond_Hair"]
    train = datasets.CelebAAttrs(faces, attrs, "train")
    test = datasets.CelebAAttrs(faces, attrs, "test")
    assert len(test) == 6 and len(train) == 54  # small files keep a tenth for test
    assert not set(train.files) & set(test.files)
    lines = (faces / "list_attr_celeba.txt").read_text().split("\n")
    names = lines[1].split()
    row = {ln.split()[0]: ln.split()[1:] for ln in lines[2:] if ln}[train.files[0].name]
    assert train.labels[0].tolist() == [float(row[names.index(a)] == "1") for a in attrs]
    x, c = train[0]
    assert x.shape == (3, 48, 48) and c.shape == (2,)  # the reader crops a centred square


def test_celeba_official_split_is_1999_test_rows(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    rows = [f"{i:06d}.jpg " + " ".join(["-1"] * 40) for i in range(1, 20001)]
    names = [f"{i:06d}.jpg" for i in range(1, 20001)]  # the reader keeps listed files it finds:
    monkeypatch.setattr(datasets.os, "listdir", lambda folder: names)  # 20,000 real ones are slow
    (tmp_path / "list_attr_celeba.txt").write_text("20000\n" + " ".join(toy.CELEBA_40) + "\n"
                                                   + "\n".join(rows) + "\n")
    test = datasets.CelebAAttrs(tmp_path, ["Young"], "test")
    assert len(test) == 1999 and len(datasets.CelebAAttrs(tmp_path, ["Young"], "train")) == 18001
    shuffled = [f"{i:06d}.jpg" for i in range(1, 20001)]
    random.seed(1234)  # the official code: random.seed(1234); random.shuffle(lines)
    random.shuffle(shuffled)
    assert [f.name for f in test.files] == shuffled[:1999]


def _edit_attr_file(faces, tmp_path, edit):
    """A copy of the toy faces (images linked) whose attribute file is edit(lines)."""
    (tmp_path / "images").symlink_to(faces / "images")
    lines = (faces / "list_attr_celeba.txt").read_text().splitlines()
    name, text = edit(lines)
    (tmp_path / name).write_text(text)
    return tmp_path


BROKEN_ATTRS = {  # edit of the official lines -> what the error must say
    "no count line": (lambda ls: ls[1:], r"line 1: expected the number of images \(e\.g\. 2025"),
    "short row": (lambda ls: ls[:4] + [ls[4].rsplit(" ", 1)[0]] + ls[5:],
                  r"line 5: 39 values after the file name, expected 40, one per name on line 2$"),
    "empty": (lambda ls: [], r"list_attr_celeba.txt: empty; expected line 1 the number of images"),
    "bad value": (lambda ls: ls[:3] + [ls[3].replace(" -1", " 2", 1)] + ls[4:],
                  r"line 4: '2' under 5_o_Clock_Shadow; expected 1 or -1"),
    "wrong count": (lambda ls: ["61"] + ls[1:], r"line 1 says 61 images but 60 rows follow"),
    "name added at the end": (lambda ls: [ls[0], ls[1] + " Smiling_Wide"] + ls[2:],
                              r"line 3: 40 values after the file name, expected 41"),
}


@pytest.mark.parametrize("case", BROKEN_ATTRS)
def test_broken_attribute_file_names_the_line(faces, tmp_path, case):
    edit, expected = BROKEN_ATTRS[case]
    root = _edit_attr_file(faces, tmp_path, lambda ls: ("list_attr_celeba.txt",
                                                        "".join(ln + "\n" for ln in edit(ls))))
    with pytest.raises(UserError, match=expected) as e:
        datasets.CelebAAttrs(root, ["Male"])
    assert "\n" not in str(e.value) and "valid names" not in str(e.value)


@pytest.mark.parametrize("variant", ["image_id column", "kaggle csv"])
def test_attribute_file_variants_keep_labels_aligned(faces, tmp_path, variant):
    def edit(lines):
        if variant == "image_id column":
            return "list_attr_celeba.txt", "\n".join([lines[0], "image_id " + lines[1], *lines[2:]])
        rows = [",".join(ln.split()) for ln in lines[2:] if ln]  # Kaggle: no count line, commas
        header = "\ufeffimage_id," + ",".join(lines[1].split())  # a BOM, as spreadsheets save it
        return "list_attr_celeba.csv", "\r\n".join([header, *rows])
    root, attrs = _edit_attr_file(faces, tmp_path, edit), ["Black_Hair", "Male"]
    for split in ("train", "test"):
        ref, got = datasets.CelebAAttrs(faces, attrs, split), datasets.CelebAAttrs(root, attrs, split)
        assert [f.name for f in got.files] == [f.name for f in ref.files]
        assert torch.equal(got.labels, ref.labels) and 0 < ref.labels.mean() < 1


def test_attribute_rows_without_an_image_are_dropped(faces, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "list_attr_celeba.txt").write_text((faces / "list_attr_celeba.txt").read_text())
    with pytest.raises(UserError, match=r"none of the 60 files listed in .*list_attr_celeba.txt "
                       r"is in .*images \(e\.g\. 000001\.jpg\)"):
        datasets.CelebAAttrs(tmp_path, ["Male"])
    for f in sorted((faces / "images").iterdir())[2:]:
        (tmp_path / "images" / f.name).symlink_to(f)
    n = sum(len(datasets.CelebAAttrs(tmp_path, ["Male"], split)) for split in ("train", "test"))
    assert n == 58 and capsys.readouterr().err.count("2 of the 60 files listed") == 1


def test_small_attribute_file_keeps_a_test_row_and_names_an_empty_split(faces, tmp_path, capsys):
    root = _edit_attr_file(faces, tmp_path, lambda ls: ("list_attr_celeba.txt",
                                                        "\n".join(["5", *ls[1:7]])))
    test = datasets.CelebAAttrs(root, ["Male"], "test")  # a tenth of 5 rows would be none
    assert len(test) == 1 and len(datasets.CelebAAttrs(root, ["Male"], "train")) == 4
    (tmp_path / "images").unlink()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / test.files[0].name).symlink_to(faces / "images" / test.files[0].name)
    with pytest.raises(UserError, match=r"none of the train split's 4 rows has its image in"):
        datasets.CelebAAttrs(root, ["Male"], "train")


def test_aligned_pairs_split_a_and_b(tmp_path):
    (tmp_path / "train").mkdir()
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # left half red (A), right half blue (B)
    img.save(tmp_path / "train" / "0.png")
    a, b = datasets.AlignedPairs(tmp_path)[0]
    assert a.shape == b.shape == (3, 32, 32)
    assert a[0].mean() == 1 and a[2].mean() == -1 and b[2].mean() == 1 and b[0].mean() == -1


def test_image_files_recursive(shapes):
    ds = datasets.ImageFiles(shapes)
    assert len(ds) == 45 and ds[0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# Toy data and its oracle
# ---------------------------------------------------------------------------------------------------
def test_toy_generator_is_deterministic(tmp_path):
    toy.write_shapes(tmp_path / "a", 32, 2, 1, seed=5)
    toy.write_shapes(tmp_path / "b", 32, 2, 1, seed=5)
    for f in (tmp_path / "a").rglob("*.png"):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    toy.write_faces(tmp_path / "c", 32, 3, seed=1)
    toy.write_faces(tmp_path / "d", 32, 3, seed=1)
    assert (tmp_path / "c/list_attr_celeba.txt").read_text() == (tmp_path / "d/list_attr_celeba.txt").read_text()


def test_toy_set_of_an_older_generator_is_rewritten(tmp_path, monkeypatch, capsys):
    write = toy.write_shapes
    monkeypatch.setattr(toy, "write_shapes", lambda root, size: write(root, size, 1, 0))
    root = tmp_path / "shapes_32"
    write(root, 32, 1, 0)
    (root / ".complete").touch()  # version 1 wrote an empty .complete
    (root / "stale").touch()
    toy.make_toy("shapes", root, 32)
    assert "generator changed" in capsys.readouterr().out
    assert (root / ".complete").read_text().strip() == toy.VERSION and not (root / "stale").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["shapes_32"]  # no .tmp or .old left
    (root / "kept").touch()
    toy.make_toy("shapes", root, 32)  # current: left alone
    assert (root / "kept").exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("size,n", [(32, 150), (64, 150), (128, 60)])
def test_oracle_reads_shapes(size, n):
    rng = random.Random(size)
    imgs, truth, facts = [], [], []
    for i in range(n):
        img, f = toy.render_shape(toy.SHAPES[i % 3], size, rng)
        imgs.append(img * 2 - 1)
        truth.append(i % 3)
        facts.append(f)
    r = toy.read_shapes(torch.stack(imgs))
    acc = (r["domain"] == torch.tensor(truth)).float().mean().item()
    assert r["valid"].all() and acc >= 0.99, acc
    colors = torch.tensor([f["color"] for f in facts])
    assert (r["color"] - colors).abs().max() < 0.3  # stripes darken the mean by up to 15 %
    circles = [i for i in range(n) if i % 3 != 2]  # centroid = centre for circles and squares
    err = (r["cx"][circles] - torch.tensor([facts[i]["cx"] for i in circles])).abs().max()
    assert err < 1.5 / size


@pytest.mark.parametrize("size", [16, 32, 64])
def test_oracle_reads_scenes(size):
    rng, n = random.Random(size), 120
    imgs, facts = zip(*(toy.render_scene(i % 3, size, rng) for i in range(n)))
    x = torch.stack(imgs) * 2 - 1
    r = toy.read_scenes(x)
    assert r["valid"].all()
    assert (r["domain"] == torch.arange(n) % 3).all()  # the sky
    shape_ok = 0.95 if size < 32 else 0.99  # a 16 px triangle is 5-9 px tall: a few read wrong
    assert (r["shape"] == torch.tensor([f["shape"] for f in facts])).float().mean() >= shape_ok
    err = (r["color"] - torch.tensor([f["color"] for f in facts])).abs()  # edges blend with the sky
    worst = 0.35 if size < 32 else 0.2  # the smallest 16 px triangles have no rim-free pixel
    assert err.mean() < 0.03 and err.max() < worst, (err.mean(), err.max())
    # The same objects (same random draws) in front of the next sky: the domain follows the sky,
    # the content stays.
    rng = random.Random(size)
    moved = torch.stack([toy.render_scene((i + 1) % 3, size, rng)[0] for i in range(n)]) * 2 - 1
    r2 = toy.read_scenes(moved)
    assert (r2["domain"] == (torch.arange(n) + 1) % 3).all()
    assert (r2["shape"] == r["shape"]).float().mean() >= 0.95
    assert (r2["cx"] - r["cx"]).abs().max() < 1.5 / size


def test_oracle_reads_faces():
    rng, n, width = random.Random(0), 80, 48
    imgs, truth = [], []
    for _ in range(n):
        img, attrs = toy.render_face(width, rng)
        top = (img.shape[1] - width) // 2
        imgs.append(img[:, top:top + width] * 2 - 1)
        truth.append([float(attrs[a]) for a in toy.FACE_ATTRS])
    r = toy.read_faces(torch.stack(imgs))
    acc = (r["attrs"] == torch.tensor(truth)).float().mean(0)
    assert r["valid"].all() and (acc >= 0.99).all(), acc
    # Grain like a short GAN run's (roughness 0.09-0.10 here) keeps a face readable and read right.
    gen = torch.Generator().manual_seed(0)
    grainy = torch.stack(imgs) + torch.randn(n, 3, width, width, generator=gen) * 0.16
    r = toy.read_faces(grainy.clamp(-1, 1))
    acc = (r["attrs"] == torch.tensor(truth)).float().mean(0)
    assert r["valid"].float().mean() >= 0.95 and (acc >= 0.95).all(), (r["valid"].float().mean(), acc)


def test_oracle_rejects_noise():
    noise = torch.rand(40, 3, 64, 64) * 2 - 1
    assert not toy.read_shapes(noise)["valid"].any()
    assert not toy.read_scenes(noise)["valid"].any()
    empty_skies = torch.stack([toy.sky(k, 32) for k in range(3)]) * 2 - 1
    assert not toy.read_scenes(empty_skies)["valid"].any()
    assert not toy.read_faces(noise)["valid"].any()
    assert not toy.read_shapes(torch.full((2, 3, 32, 32), -0.76))["valid"].any()  # empty background


# ---------------------------------------------------------------------------------------------------
# Checkpoints, run folders, CLI
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cfg:
    data: str = ""  # dataset folder
    lr: float = 1e-4  # learning rate (100 % of the paper's)
    amp: bool = True  # bf16 autocast on CUDA
    attrs: tuple[str, ...] = ("Male", "Young")  # attribute names
    batch: int = 8  # batch size


def test_cli_from_dataclass_presets_and_flags(capsys):
    presets = {"toy": {"batch": 2}, "afhq": {"lr": 2e-4}}
    cfg, ns = common.parse_config(Cfg, presets, [], modes=("train", "sample"))
    assert (cfg.batch, ns.preset, ns.mode) == (2, "toy", "train")
    cfg, ns = common.parse_config(Cfg, presets, ["sample", "--data", "x/afhq", "--no-amp", "--batch",
                                                 "4", "--attrs", "Male", "Bald"], modes=("train", "sample"))
    assert (cfg.lr, cfg.amp, cfg.batch, cfg.attrs, ns.mode) == (2e-4, False, 4, ("Male", "Bald"), "sample")
    with pytest.raises(SystemExit):
        common.parse_config(Cfg, presets, ["--help"])
    out = capsys.readouterr().out
    assert "bf16 autocast on CUDA" in out and "100 % of the paper's" in out


def test_checkpoint_round_trip_restores_everything(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    common.save_checkpoint(tmp_path / "last.pt", 7, Cfg(), {"G": net}, {"G": opt}, {"note": 1})
    expected = torch.rand(3)
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters())
    state = common.load_checkpoint(tmp_path / "last.pt", {"G": net2}, {"G": opt2})
    assert torch.equal(torch.rand(3), expected)  # RNG state restored to the moment of saving
    assert state["step"] == 7 and state["config"]["attrs"] == ("Male", "Young") or \
        state["config"]["attrs"] == ["Male", "Young"]
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_checkpoint_strips_prefixes_and_is_atomic(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped.module = net  # saved keys would start with "module."
    common.save_checkpoint(tmp_path / "last.pt", 1, Cfg(), {"G": wrapped}, {})
    sd = torch.load(tmp_path / "last.pt", weights_only=True)["nets"]["G"]
    assert set(sd) == {"weight", "bias"}
    before = (tmp_path / "last.pt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(UserError):
        common.save_checkpoint(tmp_path / "last.pt", 2, Cfg(), {"G": net}, {})
    assert (tmp_path / "last.pt").read_bytes() == before


@dataclasses.dataclass
class RunCfg:
    out: str = ""  # run folder
    resume: str = ""  # "", auto or a checkpoint
    overwrite: bool = False  # start over
    data: str = ""  # dataset (refused when changed on resume)
    img_size: int = 16  # architecture (refused when changed on resume)
    lr: float = 1e-4  # optimisation (applied when changed on resume)
    total_iters: int = 10  # optimisation


def run_cfg(out, **kw):
    return RunCfg(out=str(out), **kw)


def save_run(out, step=3, **kw):
    common.save_checkpoint(out / "last.pt", step, run_cfg(out, **kw), {}, {})
    return out / "last.pt"


def test_run_folder_is_never_silently_overwritten(tmp_path):
    assert common.prepare_run(run_cfg(tmp_path)) == (run_cfg(tmp_path), None)
    save_run(tmp_path)
    with pytest.raises(UserError, match="--resume auto"):
        common.prepare_run(run_cfg(tmp_path))
    assert common.prepare_run(run_cfg(tmp_path, resume="auto"))[1] == tmp_path / "last.pt"
    with pytest.raises(UserError, match="no such checkpoint"):
        common.prepare_run(run_cfg(tmp_path, resume=str(tmp_path / "nope.pt")))
    (tmp_path / "bad.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="bad.pt: cannot read"):
        common.load_checkpoint(tmp_path / "bad.pt", {})


def test_resume_from_another_file_never_replaces_a_run(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = save_run(tmp_path / "a"), save_run(tmp_path / "b", step=5)
    before = a.read_bytes()
    with pytest.raises(UserError) as e:
        common.prepare_run(run_cfg(tmp_path / "a", resume=str(b)))
    assert str(b) in str(e.value) and str(a) in str(e.value) and a.read_bytes() == before
    assert "--overwrite" in str(e.value) and "--resume auto" in str(e.value)
    # The run's own last.pt named by path is --resume auto; a new folder needs no --overwrite.
    assert common.prepare_run(run_cfg(tmp_path / "a", resume=str(a)))[1] == a
    assert common.prepare_run(run_cfg(tmp_path / "c", resume=str(b)))[1] == b


def test_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    save_run(out)
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "samples" / "000001.png").write_bytes(b"png")
    assert common.prepare_run(run_cfg(out, overwrite=True)) == (run_cfg(out, overwrite=True), None)
    assert [p.name for p in out.iterdir()] == [".lock"]  # a clean folder: its lock, no old log
    old = tmp_path / "run.old-1"
    assert {p.name for p in old.iterdir()} == {".lock", "last.pt", "log.jsonl", "samples"}
    assert f"moved the previous run {out} to {old}" in capsys.readouterr().out
    save_run(out)
    _, ckpt = common.prepare_run(run_cfg(out, overwrite=True, resume=str(out / "last.pt")))
    assert ckpt == out / "last.pt"  # its own last.pt: a resume, nothing moved
    backup = out / "backup.pt"
    backup.write_bytes(ckpt.read_bytes())
    _, ckpt = common.prepare_run(run_cfg(out, overwrite=True, resume=str(backup)))
    assert ckpt == tmp_path / "run.old-2" / "backup.pt" and [p.name for p in out.iterdir()] == [
        ".lock"]


def test_ctrl_c_during_save_is_held_until_the_file_is_complete(tmp_path, monkeypatch):
    net, real_save, cfg = torch.nn.Linear(2, 2), torch.save, run_cfg(tmp_path)
    common.save_checkpoint(tmp_path / "last.pt", 1, cfg, {"G": net}, {})

    def save_with_ctrl_c(obj, f, *a, **k):  # Ctrl-C pressed twice while the file is written
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", save_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # delivered once the checkpoint is complete
        common.save_checkpoint(tmp_path / "last.pt", 2, cfg, {"G": net}, {})
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    common.save_checkpoint(tmp_path / "last.pt", 3, cfg, {"G": net}, {}, interrupted=True)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no last.pt.tmp left
    (tmp_path / "last.pt.tmp").write_bytes(b"half")  # left by a killed process
    common.prepare_run(run_cfg(tmp_path, resume="auto"))
    assert not (tmp_path / "last.pt.tmp").exists()


def test_non_finite_state_is_never_saved(tmp_path):
    net = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / "last.pt", 1, Cfg(), {"G": net}, {})
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(UserError, match=r"step 2: loss term 'D/adv' is inf; stopping without "
                                        rf"saving. Last good checkpoint: {tmp_path / 'last.pt'}"):
        common.save_checkpoint(tmp_path / "last.pt", 2, Cfg(), {"G": net}, {},
                               losses={"D/adv": torch.tensor(float("inf"))}, interrupted=True)
    with torch.no_grad():
        net.bias[1] = float("nan")  # finite losses, but the update that followed broke a weight
    with pytest.raises(UserError, match=r"step 3: G\.bias is not finite; stopping without"):
        common.save_checkpoint(tmp_path / "last.pt", 3, Cfg(), {"G": net}, {},
                               losses={"D/adv": 0.5})
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_applies_optimisation_settings_and_refuses_architecture(tmp_path, capsys):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.0, 0.99))
    net(torch.randn(3, 2)).sum().backward()
    opt.step()
    common.save_checkpoint(tmp_path / "last.pt", 3, run_cfg(tmp_path, lr=1e-4, data="/a/afhq"),
                           {"G": net}, {"G": opt})
    # Flags left out keep the run's values; a changed optimisation flag is applied and printed.
    cfg, ckpt = common.prepare_run(run_cfg(tmp_path, resume="auto", lr=1e-3, total_iters=5,
                                           data="/b/afhq"), given=("lr", "resume"), fixed=FIXED)
    assert (cfg.lr, cfg.total_iters, cfg.data) == (1e-3, 10, "/a/afhq")
    assert "resume: lr 0.0001 -> 0.001 (applied)" in capsys.readouterr().out
    opt2 = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    common.load_checkpoint(ckpt, {"G": net}, {"G": opt2})
    group = opt2.param_groups[0]  # the moments come from the file, the settings from this run
    assert (group["lr"], group["betas"]) == (1e-3, (0.5, 0.9))
    assert opt2.state_dict()["state"][0]["step"] == 1
    # A dataset copy moved elsewhere (same folder name) is applied; another one is refused.
    cfg, _ = common.prepare_run(run_cfg(tmp_path, resume="auto", data="/b/afhq"),
                                given=("data",), fixed=FIXED)
    assert cfg.data == "/b/afhq"
    for flag, value in (("img_size", 32), ("data", "/a/celeba")):
        with pytest.raises(UserError) as e:
            common.prepare_run(run_cfg(tmp_path, resume="auto", **{flag: value}),
                               given=(flag,), fixed=FIXED)
        was = {"img_size": 16, "data": "/a/afhq"}[flag]
        assert f"--{flag.replace('_', '-')} {value}: " in str(e.value)
        assert f"was trained with {flag} {was}" in str(e.value) and str(tmp_path) in str(e.value)


FIXED = ("data", "img_size")


@dataclasses.dataclass
class SampleCfg:
    out: str = ""  # LOCAL; when not given, the checkpoint's folder
    device: str = "cpu"  # LOCAL: always this command's
    img_size: int = 4  # architecture: always the checkpoint's
    batch: int = 8  # per invocation: this command's when given
    seed: int = 0  # left out: the run's


def build_linear(cfg, extra):  # a net whose shape depends on the architecture field
    return {"G": torch.nn.Linear(cfg.img_size, 2)}


def test_load_run_takes_the_architecture_from_the_checkpoint(tmp_path):
    run, net = tmp_path / "run", torch.nn.Linear(8, 2)
    run.mkdir()
    trained = SampleCfg(out=str(run), device="cuda:3", img_size=8, batch=32, seed=5)
    common.save_checkpoint(run / "last.pt", 3, trained, {"G": net}, {}, extra={"names": ["a"]})
    seen = []
    build = lambda cfg, extra: seen.append(extra) or build_linear(cfg, extra)  # noqa: E731
    here = SampleCfg(out=str(run), device="cpu", img_size=4, batch=2, seed=0)
    cfg, nets, extra = common.load_run(here, "", build, given=("batch",), fixed=("img_size",))
    assert (cfg.img_size, cfg.seed) == (8, 5)  # the architecture; a flag left out
    assert (cfg.batch, cfg.device) == (2, "cpu")  # a flag given; a LOCAL setting
    assert seen == [{"names": ["a"]}] == [extra] and torch.equal(nets["G"].weight, net.weight)
    # --ckpt elsewhere: the outputs go beside it, unless --out is given
    elsewhere = SampleCfg(out=str(tmp_path / "other"))
    assert common.load_run(elsewhere, run / "last.pt", build_linear)[0].out == str(run)
    assert common.load_run(elsewhere, run / "last.pt", build_linear, given=("out",))[0].out == \
        str(tmp_path / "other")
    with pytest.raises(UserError, match=r"^--img-size 4: .*run/last.pt was trained with img_size "
                                        r"8; .*leave --img-size out"):
        common.load_run(here, "", build_linear, given=("img_size",), fixed=("img_size",))


def test_load_run_names_a_bad_file_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    common.save_checkpoint(good, 1, SampleCfg(img_size=8), {"G": torch.nn.Linear(8, 2)}, {})
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:600])
    common.save_checkpoint(tmp_path / "other.pt", 1, run_cfg(tmp_path), {}, {})  # another script's
    torch.save({"weight": torch.zeros(2, 4)}, tmp_path / "plain.pt")  # e.g. a released file
    cases = {"missing.pt": "no such checkpoint; train first, or pass --ckpt FILE",
             "empty.pt": "cannot read this checkpoint", "cut.pt": "cannot read this checkpoint",
             "other.pt": "not a checkpoint of this script", "plain.pt": "not a checkpoint of this "
             "script"}
    for name, why in cases.items():
        with pytest.raises(UserError) as e:
            common.load_run(SampleCfg(), tmp_path / name, build_linear)
        assert str(e.value).startswith(f"{tmp_path / name}: {why}") and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"good.pt: not a checkpoint of this script \(.*state_dict"):
        common.load_run(SampleCfg(), good, lambda cfg, extra: {"G": torch.nn.Linear(3, 2)})

    def official(path, nets):  # a file with no training state, into nets of this command's cfg
        nets["G"].load_state_dict({"weight": torch.load(path)["weight"], "bias": torch.ones(2)})
        return nets

    cfg, nets, extra = common.load_run(SampleCfg(), tmp_path / "plain.pt", build_linear,
                                       official=official)
    assert cfg == SampleCfg() and extra == {} and nets["G"].bias.tolist() == [1.0, 1.0]
def test_non_finite_loss_names_step_and_term(tmp_path):
    common.check_finite({"D/real": torch.tensor(0.5)}, 3)
    with pytest.raises(UserError, match=r"step 12: loss term 'G/sty' is nan.*none yet"):
        common.check_finite({"D/real": 0.1, "G/sty": float("nan")}, 12, tmp_path / "last.pt")
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match=rf"step 12: loss term 'G/sty' is -inf.*{tmp_path}/last.pt"):
        common.check_finite({"G/sty": float("-inf")}, 12, tmp_path / "last.pt")


def test_unreadable_or_foreign_checkpoint_names_the_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    common.save_checkpoint(tmp_path / "good.pt", 1, Cfg(), {"G": torch.nn.Linear(2, 2)}, {})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:500])
    for name in ("empty.pt", "cut.pt"):
        with pytest.raises(UserError, match=rf"{name}: cannot read this checkpoint .*truncated"):
            common.read_checkpoint(tmp_path / name, Cfg)
    common.save_checkpoint(tmp_path / "other.pt", 1, RunCfg(), {}, {})  # another script's
    with pytest.raises(UserError, match=r"other.pt: not a checkpoint of this script"):
        common.read_checkpoint(tmp_path / "other.pt", Cfg)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match=r"plain.pt: not a checkpoint of this script"):
        common.read_checkpoint(tmp_path / "plain.pt", Cfg)
    assert set(common.read_checkpoint(tmp_path / "plain.pt", Cfg, ours=False)) == {"weight"}
    assert common.read_checkpoint(tmp_path / "good.pt", Cfg)["step"] == 1


def test_flag_checks_name_the_flag_and_the_range():
    @dataclasses.dataclass
    class Flags:
        batch: int = 8
        lr: float = 1e-4
        num_workers: int = 0
        betas: tuple[float, ...] = (0.0, 0.99)

    def check(**kw):
        common.check_flags(Flags(**kw), positive="batch lr", nonneg="num_workers", unit="betas")
    check()
    for kw, msg in ((dict(batch=0), "--batch 0: must be ≥ 1"),
                    (dict(lr=-1.0), "--lr -1.0: must be > 0"),
                    (dict(lr=float("nan")), "--lr nan: must be > 0"),
                    (dict(num_workers=-2), "--num-workers -2: must be ≥ 0"),
                    (dict(betas=(0.5, 1.5)), "--betas 0.5 1.5: each must be in [0, 1)")):
        with pytest.raises(UserError, match=re.escape(msg)):
            check(**kw)
    with pytest.raises(UserError, match=r"--device tpu: use auto, cpu, cuda or cuda:N"):
        common.pick_device("tpu")
    assert common.pick_device("cpu") == torch.device("cpu")


def test_main_guard_turns_ctrl_c_into_one_line(capsys):
    survived = []

    def main(argv):
        try:
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C stops the command ...
        except KeyboardInterrupt:
            signal.raise_signal(signal.SIGINT)  # ... more, e.g. while it saves, are ignored
            survived.append(argv)
            raise
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as e:
            common.main_guard(main)  # no argv: as on the command line
    finally:
        signal.signal(signal.SIGINT, before)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n" and survived == [None]


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line each
# ---------------------------------------------------------------------------------------------------
def test_missing_data_folder_names_download_and_toy(tmp_path):
    with pytest.raises(UserError, match=r"data/download.py afhq.*--data toy"):
        datasets.resolve_data(str(tmp_path / "afhq"), "shapes", 32)


def test_bad_domain_folders(tmp_path):
    with pytest.raises(UserError, match="missing"):
        datasets.DomainFolder(tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    with pytest.raises(UserError, match="at least 2"):
        datasets.DomainFolder(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(UserError, match=r"train/dog: no images"):
        datasets.DomainFolder(tmp_path)


def test_corrupt_image_is_named_and_skipped(tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / "train" / d).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "train" / d / "good.png")
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"not a png")
    ds = datasets.DomainFolder(tmp_path)
    i = [str(p) for p, _ in ds.samples].index(str(tmp_path / "train" / "a" / "bad.png"))
    x, y = ds[i]
    assert x.shape == (3, 8, 8) and y == 0 and ds.n_skipped == 1
    assert "bad.png" in capsys.readouterr().err
    with pytest.raises(UserError, match="bad.png"):
        datasets.load_rgb(tmp_path / "train" / "a" / "bad.png")


def _reader_with_bad_files(kind, root):
    """(reader, names of its unreadable files): each reader over a small set with damaged files."""
    if kind in ("domains", "images"):
        toy.write_shapes(root, 16, n_train=3, n_val=0, seed=0)
        bad = [write_unreadable(root / "train" / d / f"{k}.png", k)
               for d, k in (("circle", "random"), ("circle", "chunk"), ("square", "empty"))]
        reader = datasets.DomainFolder(root) if kind == "domains" else datasets.ImageFiles(root)
    elif kind == "celeba":
        toy.write_faces(root, 24, n=12, seed=0)
        reader = datasets.CelebAAttrs(root, ["Male"], "train")
        bad = [write_unreadable(f, k) for f, k in zip(reader.files[3:5], ("text", "random"))]
    else:  # aligned pairs
        (root / "train").mkdir()
        for i in range(3):
            Image.new("RGB", (16, 8), (40 * i, 0, 0)).save(root / "train" / f"{i}.png")
        bad = [write_unreadable(root / "train" / "00.png", "empty")]  # sorts first
        reader = datasets.AlignedPairs(root)
    return reader, [f.name for f in bad]


@pytest.mark.parametrize("kind", ["domains", "celeba", "pairs", "images"])
def test_every_reader_skips_unreadable_files_and_names_each_once(tmp_path, capsys, kind):
    reader, bad = _reader_with_bad_files(kind, tmp_path)
    for _ in range(3):  # every file drawn three times: still one warning per damaged file
        items = [reader[i] for i in range(len(reader))]
    lines = capsys.readouterr().err.splitlines()
    assert reader.n_skipped == len(bad) and len(lines) == len(bad), lines
    for name, line in zip(sorted(bad), sorted(lines, key=lambda ln: ln.split("/")[-1])):
        assert line.startswith("warning: skipping ") and f"{name}: cannot read" in line, line
    if kind == "domains":  # a replacement comes from the same domain: labels stay right
        assert [y for _, y in items] == reader.targets


def test_skipped_file_is_named_once_across_workers_and_epochs(tmp_path, capfd):
    toy.write_shapes(tmp_path, 16, n_train=4, n_val=0, seed=0)
    write_unreadable(tmp_path / "train" / "circle" / "bad.png", "random")
    ds = datasets.DomainFolder(tmp_path)
    for epoch in range(3):  # 03 and 04 build a loader (new worker processes) every epoch
        assert len(list(datasets.make_loader(ds, 13, num_workers=2, seed=epoch))) == 1
    err = capfd.readouterr().err
    assert err.count("bad.png") == 1 and ds.n_skipped == 1, err  # the main process counts too


def test_unreadable_domain_is_one_line_also_with_workers(tmp_path):
    toy.write_shapes(tmp_path, 16, n_train=2, n_val=0, seed=0)
    for f in (tmp_path / "train" / "square").iterdir():
        write_unreadable(f, "text")
    ds, before = datasets.DomainFolder(tmp_path), set(multiprocessing.active_children())
    with pytest.raises(UserError) as e:
        next(iter(datasets.make_loader(ds, len(ds), num_workers=1)))
    assert set(multiprocessing.active_children()) <= before  # its worker stopped, not left to gc
    msg = str(e.value)
    assert "\n" not in msg and "Caught" not in msg, msg  # not DataLoader's wrapped traceback
    assert msg.startswith(f"{tmp_path / 'train' / 'square'}: none of its 2 images is readable")


def test_val_domains_must_match_train(tmp_path):
    toy.write_shapes(tmp_path, 16, n_train=1, n_val=1, seed=0)
    (tmp_path / "val" / "circle").rename(tmp_path / "val" / "oval")
    with pytest.raises(UserError, match=r"val: domain folders \['oval', 'square', 'triangle'\] "
                       r"differ from train/'s \['circle', 'square', 'triangle'\]"):
        datasets.DomainFolder(tmp_path, "val")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    img = Image.new("RGB", (6, 4), (255, 255, 255))
    if mode == "I;16":
        img = Image.frombytes("I;16", (6, 4), b"\xff\xff" * 24)  # 16-bit white
    else:
        img = img.convert(mode)
    img.save(path)
    out = datasets.load_rgb(path)
    assert out.mode == "RGB" and out.size == (6, 4) and min(out.getpixel((0, 0))) >= 250


def test_unknown_attribute_lists_valid_names(faces):
    with pytest.raises(UserError, match=r"\['Blnd_Hair'\].*Blond_Hair"):
        datasets.CelebAAttrs(faces, ["Blnd_Hair"])


def test_common_imports_nothing_from_data():
    """data/ imports common (errors, ranks); the reverse would be a circle."""
    code = "import sys, common; print([m for m in sys.modules if m.split('.')[0] == 'data'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_main_guard_prints_one_line_and_exits_2(tmp_path):
    code = ("import common\nfrom data import datasets\ndef main(argv):\n"
            "    datasets.resolve_data('nope/afhq', 'shapes', 32)\ncommon.main_guard(main)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: --data")


def test_batch_larger_than_dataset(shapes):
    with pytest.raises(UserError, match="--batch 100"):
        datasets.make_loader(datasets.DomainFolder(shapes, "val"), 100)


# ---------------------------------------------------------------------------------------------------
# Metric backbones, with random weights (no network)
# ---------------------------------------------------------------------------------------------------
def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    assert abs(metrics.frechet_distance(a, a)) < 1e-6
    near, far = metrics.frechet_distance(a, b), metrics.frechet_distance(a, b + 1.0)
    assert near < 0.5 and abs(far - near - 8.0) < 0.5  # a shift of 1 per dimension adds ‖Δμ‖² = 8
    assert metrics.frechet_distance(a, b * 2) > 4  # a wider distribution is far too


def test_lpips_with_random_weights():
    torch.manual_seed(0)
    lp = metrics.LPIPS("alex", pretrained=False)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(3))
    near, far = lp(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)), lp(x, torch.rand_like(x) * 2 - 1)
    assert (near > 0).all() and (far > near).all()


def test_inception_features_and_fid_grows_with_shift():
    torch.manual_seed(0)
    net = metrics.InceptionPool(pretrained=False)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    f = net(x)
    assert f.shape == (6, 2048) and (f >= 0).all()  # after ReLU + average pooling
    assert torch.allclose(net(x), f)  # eval mode: deterministic


# ---------------------------------------------------------------------------- output
def test_console_line_fits_and_its_first_line_has_a_rate(tmp_path, monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(common.time, "time", lambda: now[0])
    show = {"D": lambda v: v["D/adv"] + 10 * v["D/gp"], "gp": "D/gp", "G": "G/adv", "x": "G/x"}
    logger = common.Logger(tmp_path, 2000, 50, show, start=0)
    now[0] = 1010.0
    logger.log(50, {"D/adv": torch.tensor(0.5), "D/gp": 0.01, "G/adv": 1.25, "extra": 7.0})
    first = capsys.readouterr().out.strip()
    # 50 steps in 10 s from the start: 5 it/s, 1950 steps to go = 390 s; G/x absent: left out
    assert first == "step 50/2000 | 5.00 it/s | ETA 0:06:30 | D 0.6 gp 0.01 G 1.25"
    logger = common.Logger(tmp_path, 2000, 50, start=50)  # default: every term while they fit
    now[0] = 1025.0
    logger.log(100, {f"term{i}": float(i) for i in range(40)})  # the rest: only in the log
    line = capsys.readouterr().out.strip()
    assert len(line) <= 120 and "term0 0" in line and "term39" not in line
    assert line.startswith("step 100/2000 | 3.33 it/s | ETA 0:09:30 |")  # 50 steps in 15 s
    logged = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged[0]["extra"] == 7.0 and logged[1]["term39"] == 39.0  # every term is logged
    logger = common.Logger(tmp_path, 400_000, 100, start=1000)  # resumed: the rate counts from
    now[0] = 2025.0  # the step it resumed at
    assert logger.line(3000, {}) == "step 3000/400000 | 2.00 it/s | ETA 55:08:20 |"


def test_loss_plot_is_a_png_that_follows_the_log(tmp_path):
    logger = common.Logger(tmp_path, 100, 10)
    for step in range(10, 60, 10):
        logger.log(step, {"D/adv": 1 / step, "D/r1": 0.01, "G/adv": step / 10})
    png = tmp_path / "losses.png"
    logger.plot(png)
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        size, first = img.size, img.convert("RGB").tobytes()
        assert img.format == "PNG" and size[0] >= 600
        # curves are drawn: the plot is not mostly white and has the panels' colours
        colours = img.convert("RGB").getcolors(size[0] * size[1])
        assert len(colours) > 20 and max(colours)[0] < 0.95 * size[0] * size[1]
    logger.log(60, {"D/adv": 5.0, "D/r1": 0.01, "G/adv": 0.1})
    logger.plot(png)
    with Image.open(png) as img:
        assert img.size == size and img.convert("RGB").tobytes() != first  # new point, new curve
    logger.log(70, {"D/adv": 5.0, "D/r1": 0.01, "G/adv": 0.1, "E/sty": 0.3})  # a third network
    logger.plot(png)
    with Image.open(png) as img:
        assert img.width == size[0] and img.height > size[1]  # one more panel
    cut = tmp_path / "log.jsonl"
    cut.write_text(cut.read_text() + '{"step": 80, "D/a')  # a line cut by a kill is skipped
    assert list(common.read_log(cut)) == [10, 20, 30, 40, 50, 60, 70]
    common.plot_log(cut, png, panels={"both": ["D/adv", "G/adv"]})
    with Image.open(png) as img:
        assert img.height < size[1]  # one panel of two strips


def test_summary_names_only_existing_files(tmp_path, capsys, monkeypatch):
    from conftest import summary_files
    monkeypatch.chdir(tmp_path)
    run = Path("runs/x")
    run.mkdir(parents=True)
    for name in ("last.pt", "log.jsonl", "a.png", "b.png"):
        (run / name).write_bytes(b"x")
    text = common.print_summary("01_x.py", 600, 200, 125.4, [
        ("samples", [run / "a.png", run / "missing.png", run / "b.png"]),
        ("checkpoint", [run / "last.pt", run / "log.jsonl"]), ("nothing", [run / "no.png"])],
        ["valid 90%", "mixing 0.8"], [("python 01_x.py sample --out runs/x", "figures"),
                                      ("python 01_x.py eval --out runs/x", "")])
    assert capsys.readouterr().out.strip() == text
    lines = text.splitlines()
    assert lines[0] == "== 01_x.py done: step 600: 400 steps in 2 min 05 s, resumed from step 200"
    assert lines[1] == "samples     runs/x/a.png b.png" and "nothing" not in text
    assert summary_files(text) == {"samples": [run / "a.png", run / "b.png"],
                                   "checkpoint": [run / "last.pt", run / "log.jsonl"]}
    assert lines[3:5] == ["oracle      valid 90%", "            mixing 0.8"]
    assert lines[5].startswith("next        python 01_x.py sample --out runs/x  # figures")
    assert all(len(ln) <= 120 for ln in lines)
    long = "python 01_x.py --out " + "d" * 120 + " --resume auto"  # a command is never wrapped
    text = common.print_summary("01_x.py", 1, 0, 1, [], "", [(long, "train on")])
    assert text.splitlines()[1:] == ["next        # train on", " " * 12 + long]


def test_small_grids_are_enlarged_and_labelled(tmp_path):
    for side, zoom in ((8, 8), (16, 4), (32, 2), (64, 1)):
        common.save_grid(torch.zeros(6, 3, side, side), tmp_path / "g.png", 3)
        with Image.open(tmp_path / "g.png") as img:
            assert img.size == (3 * side * zoom + 4, 2 * side * zoom + 3)  # 1 px padding
    common.save_grid(torch.zeros(6, 3, 32, 32), tmp_path / "g.png", 3, rows=["a", "bb"],
                     cols=["x", "y", "z"])
    with Image.open(tmp_path / "g.png") as img:
        assert img.width > 3 * 64 + 4 and img.height == 2 * 64 + 3 + 18
    frames = [torch.zeros(3, 16, 40), torch.ones(3, 16, 40)]
    common.save_gif(frames, tmp_path / "a.gif")
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.size == (160, 64) and gif.n_frames == 2


# ---------------------------------------------------------------------------------------------------
# A long run on a shared cluster: one run per folder, a full disk, an --out that is no folder
# ---------------------------------------------------------------------------------------------------
HOLD = """import sys, time; sys.path.insert(0, sys.argv[1]); import common
from test_common import run_cfg
common.prepare_run(run_cfg(sys.argv[2])); print('holding', flush=True); time.sleep(60)"""


def test_one_run_per_folder_and_a_dead_run_never_blocks(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(Path(__file__).parent), str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        for cfg in (run_cfg(out), run_cfg(out, resume="auto"), run_cfg(out, overwrite=True)):
            with pytest.raises(UserError) as e:
                common.prepare_run(cfg)
            assert str(e.value) == (f"--out {out}: another run is using this folder (host "
                                    f"{socket.gethostname()}, pid {holder.pid}); wait for it to end "
                                    "or stop it, or pass another --out")
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; the OS releases its lock
        holder.wait()
    assert common.prepare_run(run_cfg(out)) == (run_cfg(out), None)
    assert (out / ".lock").read_text() == f"host {socket.gethostname()}, pid {os.getpid()}\n"


def test_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(UserError, match=f"^--out {tmp_path}/f: is a file, not a folder; pass a"):
        common.prepare_run(run_cfg(tmp_path / "f"))
    with pytest.raises(UserError, match=f"^--out {tmp_path}/f/run: cannot make this folder "
                       f"\\(Not a directory: {tmp_path}/f/run\\)"):
        common.prepare_run(run_cfg(tmp_path / "f" / "run"))
    assert (tmp_path / "f").read_text() == "not a folder"


def test_failed_save_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    net, real_save, last = torch.nn.Linear(2, 2), torch.save, tmp_path / "last.pt"
    common.save_checkpoint(last, 1, Cfg(), {"G": net}, {})
    before = last.read_bytes()

    def disk_full(obj, f, *a, **k):  # as torch's writer fails: a RuntimeError from the OSError
        Path(f).write_bytes(b"half") if isinstance(f, (str, Path)) else f.write(b"half")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as e:
        common.save_checkpoint(last, 2, Cfg(), {"G": net}, {})
    free = shutil.disk_usage(tmp_path).free / 2**30
    assert re.fullmatch(rf"step 2: cannot write the checkpoint {last} \(No space left on device; "
                        rf"[0-9.]+ GiB free there\); stopping. The last good checkpoint, {last}, "
                        r"is untouched: make room \(or fix the folder\), then continue with "
                        r"--resume auto", str(e.value))
    assert float(re.search(r"([0-9.]+) GiB free", str(e.value))[1]) == pytest.approx(free, abs=0.1)
    assert last.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    (tmp_path / "last.pt").unlink()  # no good checkpoint yet: "none yet"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(
        OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))  # a quota refuses at the sync
    with pytest.raises(UserError, match=r"\(Disk quota exceeded; .* checkpoint, none yet, is"):
        common.save_checkpoint(last, 3, Cfg(), {"G": net}, {})
    assert not any(tmp_path.iterdir())


def test_log_lines_past_the_checkpoint_are_set_aside(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a killed run: step 5 cut short
    common.Logger(tmp_path, 10, 1, start=2)  # resumes from a checkpoint of step 2
    assert log.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert (tmp_path / "log.jsonl.old-1").read_text().startswith("\n".join(lines))
    assert capsys.readouterr().out == (f"{log}: 3 line(s) past step 2, where this run starts, set "
                                       "aside (the previous log is kept as log.jsonl.old-1)\n")
    common.Logger(tmp_path, 10, 1, start=2).log(3, {"loss": 0.5})
    assert common.read_log(log) == {1: {"loss": 0.1}, 2: {"loss": 0.2}, 3: {"loss": 0.5}}
    assert "set aside" not in capsys.readouterr().out  # nothing past step 2 the second time
    common.Logger(tmp_path, 10, 1, start=0)  # a fresh start: nothing of an earlier run stays
    assert log.read_text() == "" and (tmp_path / "log.jsonl.old-2").exists()


def test_threads_follow_the_cpus_other_programs_leave_free(monkeypatch, capsys):
    # (time, busy CPU seconds of the machine, this process's CPU seconds, CPUs): scripted looks.
    looks = iter([(0, 0, 0, 2), (3, 6, 3, 2),      # others kept 1 CPU busy: 2 threads -> 1
                  (6, 9, 6, 2),                    # others idle: back to 2
                  (9, 12.6, 9, 2),                 # others 0.2 CPU: stay at 2
                  (12, 18.6, 9, 2)])               # others 2 CPUs: still at least 1
    monkeypatch.setattr(common, "_cpu_seconds", lambda: next(looks))
    monkeypatch.setattr(common, "_CPU", {"last": None, "most": None})
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    seen = []
    for _ in range(5):
        common.fit_threads(every=0)
        seen.append(torch.get_num_threads())
    assert seen == [2, 1, 2, 2, 1]
    assert "CPU threads 2 -> 1: other programs kept 1.0 of the 2 CPUs busy" in capsys.readouterr().out
    # Pinned by the user (or torchrun): never changed, whatever the machine does.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(common, "_cpu_seconds", lambda: (0, 0, 0, 2))
    torch.set_num_threads(2)
    common.fit_threads(every=0)
    assert torch.get_num_threads() == 2


def test_every_step_looks_at_the_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "fit_threads", lambda: calls.append(1))
    assert common.next_batch(iter([7])) == 7 and calls == [1]


def test_cpu_seconds_reads_this_machine():
    t, busy, own, n = common._cpu_seconds()
    assert n == common.usable_cpus() and 0 < own <= busy and t > 0


def test_threads_are_left_alone_where_there_is_no_proc(monkeypatch):
    looks = []
    monkeypatch.setattr(common, "_cpu_seconds", lambda: looks.append(1))  # None: no /proc
    monkeypatch.setattr(common, "_CPU", {"last": None, "most": None})
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    for _ in range(3):
        common.fit_threads(every=0)
    assert looks == [1] and torch.get_num_threads() == 2  # one look, not one per step

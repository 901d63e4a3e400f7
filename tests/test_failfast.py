"""Fail in the first minute, never lose more than minutes: every script writes its sample grids,
runs the toy oracle and writes (and reads back) a checkpoint once before its first step, without
changing what it trains; last.pt is also saved by wall time; a crash names the step and the
checkpoint it left alone; the default loader workers fit the CPUs this process may use."""
import datetime
import json
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp

import common
from common import UserError
from conftest import load_script
from data import toy

TINY = {  # flags of a tiny run on each script's toy data, and the step-0 files it must write
    "01_stargan_v1": (["--img-size", "32", "--g-conv-dim", "4", "--d-conv-dim", "4",
                       "--g-repeat-num", "1", "--d-repeat-num", "4", "--batch", "4",
                       "--cls-iters", "2"], ["sample_000000.jpg"]),
    "02_stargan_v2": (["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16"],
                      [f"samples/000000_{k}.png" for k in ("cycle", "reference",
                                                           "latent_psi1.0")]),
    "03_bicyclegan_latent": (["--ngf", "8", "--nef", "8", "--ndf", "8", "--batch", "2"],
                             ["samples/0000000.png"]),
    "04_stylegan_mapping": (["--img-size", "16", "--w-dim", "16", "--fmap-base", "64",
                             "--fmap-max", "16", "--batch", "4", "--oracle-samples", "50"],
                            ["sample_000000.png"]),
}
# What draws images or scores: patched out, a run samples nothing (and so draws nothing for it)
SAMPLING = {"01_stargan_v1": {"save_translations": None, "translation_scores": ""},
            "02_stargan_v2": {"write_samples": None, "oracle_scores": None},
            "03_bicyclegan_latent": {"sample_grid": None, "toy_oracle": ""},
            "04_stylegan_mapping": {"save_grid": None, "oracle_scores": {},
                                    "figure_scores": {}, "oracle_lines": []}}


@pytest.mark.parametrize("name", TINY)
def test_step0_grids_exist_after_a_1_step_run(name, tmp_path, capsys):
    flags, files = TINY[name]
    load_script(name).main(flags + ["--out", str(tmp_path), "--total-iters", "1",
                                    "--sample-every", "100"])
    assert all((tmp_path / f).is_file() for f in files)
    out = capsys.readouterr().out
    assert "oracle @ 0: " in out  # the toy oracle ran before the first step
    assert re.search(r"\| from step 0 \| 0 loader workers \(\d+ CPUs\)", out)
    assert not (tmp_path / "last.pt.tmp").exists()  # the checkpoint probe was removed
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("name", TINY)
def test_sampling_never_changes_the_training(name, tmp_path, monkeypatch):
    """The same weights after 2 steps with grids at every step and the step-0 work (grids, oracle)
    as with no sampling at all: sampling draws nothing from the training generators."""
    m, (flags, _) = load_script(name), TINY[name]
    m.main(flags + ["--out", str(tmp_path / "a"), "--total-iters", "2", "--sample-every", "1"])
    for fn, value in SAMPLING[name].items():
        monkeypatch.setattr(m, fn, lambda *a, value=value, **kw: value)
    m.main(flags + ["--out", str(tmp_path / "b"), "--total-iters", "2", "--sample-every", "100"])
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["nets"] for r in "ab")
    differ = [f"{k}.{n}" for k in a for n in a[k] if not torch.equal(a[k][n], b[k][n])]
    assert not differ, differ[:3]


def tiny_04(tmp_path):
    """04 and its flags on a folder of 12 images (not the toy data: no oracle to wait for)."""
    toy.write_shapes(tmp_path / "data", 16, n_train=4, n_val=0)
    flags = TINY["04_stylegan_mapping"][0] + ["--data", str(tmp_path / "data"), "--num-workers",
                                              "0", "--sample-every", "100"]
    return load_script("04_stylegan_mapping"), flags


def test_last_pt_is_saved_by_wall_time(tmp_path, monkeypatch):
    """A clock that moves a minute per step, --save-minutes 2.5: saves after steps 3 and 6 (and
    at the end), though --save-every is 100."""
    m, flags = tiny_04(tmp_path)
    now, saved, real = [0.0], [], m.save_checkpoint
    monkeypatch.setattr(common.SaveTimer, "clock", staticmethod(lambda: now[0]))
    real_step = m.d_step

    def d_step(*a, **kw):  # a minute per training step
        now[0] += 60
        return real_step(*a, **kw)
    monkeypatch.setattr(m, "d_step", d_step)
    monkeypatch.setattr(m, "finish", lambda *a, **kw: None)  # the figures: not about saving
    monkeypatch.setattr(m, "save_checkpoint", lambda path, step, *a, **kw: (
        saved.append(step), real(path, step, *a, **kw)))
    m.main(flags + ["--out", str(tmp_path / "run"), "--total-iters", "7", "--save-every", "100",
                    "--save-minutes", "2.5"])
    assert saved == [3, 6, 7]
    saved.clear()
    m.main(flags + ["--out", str(tmp_path / "off"), "--total-iters", "7", "--save-every", "4",
                    "--save-minutes", "0"])
    assert saved == [4, 7]  # 0: by steps only


def test_a_crash_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    m, flags = tiny_04(tmp_path)
    real, calls = m.d_step, []

    def d_step(*a, **kw):  # a bug in step 3
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **kw)
    monkeypatch.setattr(m, "d_step", d_step)
    with pytest.raises(RuntimeError, match="boom"):  # the traceback is for the bug report
        m.main(flags + ["--out", str(tmp_path / "run"), "--total-iters", "5", "--save-every", "2"])
    err = capsys.readouterr().err
    assert f"error: RuntimeError after step 2; nothing was saved since. Last good checkpoint: " \
           f"{tmp_path / 'run' / 'last.pt'} (saved " in err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_an_unwritable_out_stops_before_the_first_step(tmp_path, monkeypatch):
    m, flags = tiny_04(tmp_path)
    steps = []
    monkeypatch.setattr(m, "d_step", lambda *a, **kw: steps.append(1) or {})

    def full(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.torch, "save", full)
    with pytest.raises(UserError, match=rf"^step 0: cannot write the checkpoint "
                                        rf"{tmp_path / 'run' / 'last.pt.tmp'} \(No space left on "
                                        r"device; [0-9.]+ GiB free there\); stopping"):
        m.main(flags + ["--out", str(tmp_path / "run"), "--total-iters", "5", "--save-every", "2"])
    assert not steps and not list((tmp_path / "run").glob("last.pt*"))


def test_default_workers_fit_the_usable_cpus(monkeypatch):
    m = load_script("02_stargan_v2")
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parse = lambda *argv: common.parse_config(m.Config, m.PRESETS, list(argv))[0]  # noqa: E731
    assert parse("--preset", "afhq").num_workers == 2  # default 4, on 2 usable CPUs
    assert parse("--preset", "afhq", "--num-workers", "3").num_workers == 3  # asked: as asked
    assert parse("--preset", "toy").num_workers == 0


def _timer_worker(rank, port, out):
    """Under torchrun, rank 0's clock alone decides a save by time: here it runs 4× faster than
    rank 1's, which on its own would never save."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    common.TIMEOUT = datetime.timedelta(seconds=60)  # a bug here fails the test, never hangs it
    common.init_distributed("cpu")
    now = [0.0]
    common.SaveTimer.clock = staticmethod(lambda: now[0])
    timer, due = common.SaveTimer(every=100, minutes=1, total=100, log_every=2), []
    for step in range(1, 8):
        now[0] += 40 if rank == 0 else 10
        due.append(timer.due(step))
    (out / f"due{rank}.json").write_text(json.dumps(due))
    torch.distributed.destroy_process_group()


def test_save_by_time_is_agreed_by_every_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.start_processes(_timer_worker, args=(port, tmp_path), nprocs=2, start_method="spawn")
    due = [json.loads((tmp_path / f"due{r}.json").read_text()) for r in range(2)]
    assert due[0] == due[1] == [False, True, False, True, False, True, False]  # at log steps


@pytest.mark.parametrize("n_val", [1, 3])
def test_03_any_val_split_gives_matching_grids(n_val, tmp_path, monkeypatch):
    """03's fixed inputs: up to 4 val images, any number (here uneven over 2 folders): one grid
    row per input, [A, B, G(A, E(B)), G(A, z_1..5)], with B the val image itself."""
    bg = load_script("03_bicyclegan_latent")
    toy.write_shapes(tmp_path / "data", 64, n_train=1, n_val=2)
    val = sorted((tmp_path / "data" / "val").rglob("*.png"))
    for f in val[n_val:]:
        f.unlink()
    grids, real = [], bg.save_grid
    monkeypatch.setattr(bg, "save_grid", lambda x, path, nrow, **kw: (
        grids.append((x.detach().cpu().clone(), nrow)), real(x, path, nrow, **kw)))
    bg.main(TINY["03_bicyclegan_latent"][0] + ["--data", str(tmp_path / "data"), "--img-size",
                                               "64", "--out", str(tmp_path / "run"),
                                               "--total-iters", "1", "--num-workers", "0"])
    images, nrow = grids[0]  # step 0
    assert nrow == 3 + 5 and len(images) == n_val * nrow
    B = torch.stack([bg.build_dataset(bg.Config(data=str(tmp_path / "data"), img_size=64),
                                      "val")[i] for i in range(n_val)])
    assert torch.allclose(images.view(n_val, nrow, 3, 64, 64)[:, 1], B, atol=1e-6)

"""Fail in the first minute, never lose more than minutes: every script writes its sample grids,
runs the toy oracle and writes (and reads back) a checkpoint once before its first step, without
changing what it trains; last.pt is also saved by wall time; a crash names the step and the
checkpoint it left alone; the default loader workers fit the CPUs this process may use."""
import re

import pytest
import torch

import common
from common import UserError
from conftest import load_script

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
                             "--fmap-max", "16", "--batch", "4"], ["sample_000000.png"]),
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
    """The same weights after 3 steps with grids at every step and the step-0 work (grids, oracle)
    as with no sampling at all: sampling draws nothing from the training generators."""
    m, (flags, _) = load_script(name), TINY[name]
    m.main(flags + ["--out", str(tmp_path / "a"), "--total-iters", "3", "--sample-every", "1"])
    for fn, value in SAMPLING[name].items():
        monkeypatch.setattr(m, fn, lambda *a, value=value, **kw: value)
    m.main(flags + ["--out", str(tmp_path / "b"), "--total-iters", "3", "--sample-every", "100"])
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["nets"] for r in "ab")
    differ = [f"{k}.{n}" for k in a for n in a[k] if not torch.equal(a[k][n], b[k][n])]
    assert not differ, differ[:3]


def test_last_pt_is_saved_by_wall_time(tmp_path, monkeypatch):
    """A clock that moves a minute per step, --save-minutes 2.5: saves after steps 3 and 6 (and
    at the end), though --save-every is 100."""
    m, (flags, _) = load_script("04_stylegan_mapping"), TINY["04_stylegan_mapping"]
    now, saved, real = [0.0], [], m.save_checkpoint
    monkeypatch.setattr(common.SaveTimer, "clock", staticmethod(lambda: now[0]))
    real_step = m.d_step

    def d_step(*a, **kw):  # a minute per training step
        now[0] += 60
        return real_step(*a, **kw)
    monkeypatch.setattr(m, "d_step", d_step)
    monkeypatch.setattr(m, "save_checkpoint", lambda path, step, *a, **kw: (
        saved.append(step), real(path, step, *a, **kw)))
    m.main(flags + ["--out", str(tmp_path), "--total-iters", "7", "--save-every", "100",
                    "--save-minutes", "2.5", "--sample-every", "100"])
    assert saved == [3, 6, 7]
    saved.clear()
    m.main(flags + ["--out", str(tmp_path / "off"), "--total-iters", "7", "--save-every", "4",
                    "--save-minutes", "0", "--sample-every", "100"])
    assert saved == [4, 7]  # 0: by steps only


def test_a_crash_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    m, (flags, _) = load_script("04_stylegan_mapping"), TINY["04_stylegan_mapping"]
    real, calls = m.d_step, []

    def d_step(*a, **kw):  # a bug in step 3
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **kw)
    monkeypatch.setattr(m, "d_step", d_step)
    with pytest.raises(RuntimeError, match="boom"):  # the traceback is for the bug report
        m.main(flags + ["--out", str(tmp_path), "--total-iters", "5", "--save-every", "2",
                        "--sample-every", "100"])
    err = capsys.readouterr().err
    assert f"error: RuntimeError after step 2; nothing was saved since. Last good checkpoint: " \
           f"{tmp_path / 'last.pt'} (saved " in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def test_an_unwritable_out_stops_before_the_first_step(tmp_path, monkeypatch):
    m, (flags, _) = load_script("04_stylegan_mapping"), TINY["04_stylegan_mapping"]
    steps = []
    monkeypatch.setattr(m, "d_step", lambda *a, **kw: steps.append(1) or {})

    def full(*a, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.torch, "save", full)
    with pytest.raises(UserError, match=rf"^--out {tmp_path}: cannot write a checkpoint there "
                                        r"\(No space left on device\); free some space"):
        m.main(flags + ["--out", str(tmp_path), "--total-iters", "5", "--save-every", "2",
                        "--sample-every", "100"])
    assert not steps and not list(tmp_path.glob("last.pt*"))


def test_default_workers_fit_the_usable_cpus(monkeypatch):
    m = load_script("02_stargan_v2")
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    parse = lambda *argv: common.parse_config(m.Config, m.PRESETS, list(argv))[0]  # noqa: E731
    assert parse("--preset", "afhq").num_workers == 2  # default 4, on 2 usable CPUs
    assert parse("--preset", "afhq", "--num-workers", "3").num_workers == 3  # asked: as asked
    assert parse("--preset", "toy").num_workers == 0

"""Several processes (torchrun), on the CPU with gloo; the test spawns its own 2 processes.
- One full training iteration of 2 processes × B leaves the same parameters in every network as
  1 process × 2B on the same samples, for each distinct pattern: 02 (four optimizers, backward
  restricted to some nets, R1, EMA), 01 (WGAN-GP, shuffled target labels), 03 (LSGAN with two
  Ds, summed KL, dropout, nets called functionally), 04 (R1, style mixing, noise images, and the
  minibatch-stddev layer, whose groups form within each process: what holds is tested).
- A 2-process toy run (torchrun) writes one run folder, one log and one checkpoint, and a
  1-process `--resume auto` continues it from the saved step, exactly.
- Faults: a global batch larger than the data, a world size the data cannot shard, a data error or
  Ctrl-C on one rank: every rank stops at once, with one message."""
import contextlib
import datetime
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import common
from common import UserError
from conftest import ROOT, build_all, load_script, stop_with_signal
from data import datasets

WORLD, TOL = 2, 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # The spawned processes take the 2 cores: 2 OpenMP threads here beside them spin and crawl.
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# One training iteration per script. rows: this process's rows of the global batch (2 processes)
# or all of them (1 process); the same seeds everywhere, so every run starts from the same state.
# In float64: a parameter whose gradient is 0 in exact arithmetic (a conv bias before an
# InstanceNorm) gets float32 rounding noise, which Adam's normalised step turns into a move of
# about ±lr: any two runs that sum in another order (2 × B or 1 × 2B) then end ~lr apart in those
# biases (1.4e-3 in 02's G). In float64 that noise is ~1e-16 and the comparison sees the method.
# ---------------------------------------------------------------------------------------------
def in_float64(iteration):
    def run(*a, **kw):
        torch.set_default_dtype(torch.float64)
        try:
            return iteration(*a, **kw)
        finally:
            torch.set_default_dtype(torch.float32)
    return run


def states(nets):
    return {k: {n: t.detach().clone() for n, t in net.state_dict().items()}
            for k, net in nets.items()}


@in_float64
def iteration_02(rows, step=True):
    m = load_script("02_stargan_v2")
    cfg = m.Config(img_size=16, dim_in=4, max_conv_dim=8, mapping_dim=8, num_domains=3,
                   batch=len(rows), lr=1e-3, f_lr=1e-3, device="cpu")
    torch.manual_seed(0)
    nets, ema = m.build_nets(cfg)
    optims = m.build_optims(nets, cfg)
    if not step:
        return states({**vars(nets), **{k + "_ema": v for k, v in vars(ema).items()}})
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 3, 16, 16, generator=g) * 2 - 1  # x_real, x_ref, x_ref2 of 4 samples
    y = torch.randint(3, (2, 4), generator=g)  # y_org, y_trg
    torch.manual_seed(2)  # the draws inside the step: z_trg, z_trg2
    m.train_step(nets, ema, optims, (x[0][rows], y[0][rows], x[1][rows], x[2][rows],
                                     y[1][rows]), 0, cfg)
    return states({**vars(nets), **{k + "_ema": v for k, v in vars(ema).items()}})


@in_float64
def iteration_01(rows, step=True):
    S = load_script("01_stargan_v1")
    cfg = S.Config(img_size=16, g_conv_dim=4, d_conv_dim=4, g_repeat_num=1, d_repeat_num=3,
                   n_critic=1, batch=len(rows), g_lr=1e-3, d_lr=1e-3)  # n_critic 1: D and G
    torch.manual_seed(0)
    G, D, opt_g, opt_d = build_all(S, cfg, [5], torch.device("cpu"))
    if not step:
        return states({"G": G, "D": D})
    g = torch.Generator().manual_seed(1)
    x, c = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 5, generator=g).round()
    torch.manual_seed(2)  # the draws inside the step: the label shuffle, WGAN-GP's α
    S.train_step(G, D, opt_g, opt_d, x[rows], c[rows], 0, cfg)
    return states({"G": G, "D": D})


@in_float64
def iteration_03(rows, step=True):
    bg = load_script("03_bicyclegan_latent")
    cfg = bg.Config(img_size=64, ngf=4, nef=4, ndf=4, batch=len(rows), dropout=True)
    torch.manual_seed(0)
    nets = bg.build_nets(cfg, torch.device("cpu"))
    opts = bg.build_optims(nets, cfg)
    if not step:
        return states(vars(nets))
    g = torch.Generator().manual_seed(1)
    A, B = torch.rand(8, 1, 64, 64, generator=g) * 2 - 1, torch.rand(8, 3, 64, 64, generator=g)
    torch.manual_seed(2)  # the draws inside the step: z of the encoder and random z, dropout
    bg.train_step(nets, opts, A[rows], B[rows] * 2 - 1, cfg, torch.device("cpu"))
    return states(vars(nets))


class PerProcessD(torch.nn.Module):
    """04's D on one process × 2B with the minibatch-stddev groups of 2 processes × B: D sees each
    half of the batch on its own, as each process does under torchrun."""
    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x):
        return torch.cat([self.D(half) for half in x.chunk(WORLD)])


@in_float64
def iteration_04(rows, step=True, per_process_d=False):
    m = load_script("04_stylegan_mapping")
    cfg = m.Config(img_size=8, w_dim=16, mapping_layers=2, fmap_base=64, fmap_max=16,
                   batch=len(rows), mixing_prob=1.0)  # mixing always: its draws are tested
    torch.manual_seed(0)
    G, D, G_ema, opt_G, opt_D = build_all(m, cfg, torch.device("cpu"))
    if not step:
        return states({"G": G, "D": D, "G_ema": G_ema})
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(2)  # the draws inside the step: z, mixing, crossover, noise images
    D_seen = PerProcessD(D) if per_process_d else D
    m.d_step(G, D_seen, opt_D, x[rows], cfg)
    m.g_step(G, D_seen, opt_G, len(rows), cfg, torch.device("cpu"))
    m.ema_update(G_ema, G, cfg)
    return states({"G": G, "D": D, "G_ema": G_ema})


# 03 halves each process's batch (cVAE-GAN | cLR-GAN): the one process gets the same halves.
ITERATIONS = {"02": (iteration_02, 4, None), "01": (iteration_01, 4, None),
              "03": (iteration_03, 8, [0, 1, 4, 5, 2, 3, 6, 7]),
              "04": (iteration_04, 8, None)}


# ---------------------------------------------------------------------------------------------
# The 2 processes: every iteration above, then the faults; results go to files in `out`.
# ---------------------------------------------------------------------------------------------
def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    common.TIMEOUT = datetime.timedelta(seconds=60)  # a bug here fails the test, never hangs it
    common.init_distributed("cpu")
    for name, (iteration, n, _) in ITERATIONS.items():
        b = n // WORLD
        rows = list(range(rank * b, (rank + 1) * b))
        torch.save(iteration(rows), out / f"{name}_rank{rank}.pt")
    said = {}
    for case in ("global batch > data", "data < world"):
        try:
            datasets.StepSampler(3 if case.startswith("global") else 1, 2)
        except UserError as e:
            said[case] = str(e)
    said["sampler"] = {mode: list(itertools.islice(datasets.StepSampler(
        10, 2, 5, 0, weights, name="x"), 7)) for mode, weights in SAMPLERS.items()}
    said.update(_fault_runs(rank, out))
    (out / f"said_rank{rank}.json").write_text(json.dumps(said))
    if torch.distributed.is_initialized():  # main_guard ends it after a run that returns
        torch.distributed.destroy_process_group()


def _fault_runs(rank, out):
    """04 on 16 images: a data error on rank 1 at step 3, then Ctrl-C on rank 1 at step 3."""
    m, said = load_script("04_stylegan_mapping"), {}
    folder = out / "images"
    if rank == 0:
        for i in range(16):
            torch.manual_seed(i)
            common.save_grid(torch.rand(1, 3, 8, 8) * 2 - 1, folder / f"{i}.png", 1)
    torch.distributed.barrier()
    flags = ["--data", str(folder), "--img-size", "8", "--w-dim", "16", "--mapping-layers", "2",
             "--fmap-base", "64", "--fmap-max", "16", "--batch", "4", "--num-workers", "0",
             "--device", "cpu", "--log-every", "1", "--save-every", "2", "--sample-every", "100"]
    real = m.real_batches
    for fault in ("data", "ctrl_c"):
        def faulty(*a, **kw):
            for i, x in enumerate(real(*a, **kw)):
                if rank == 1 and i == 2 and fault == "data":
                    raise UserError("bad.png: cannot read this image")
                if rank == 1 and i == 2:
                    signal.raise_signal(signal.SIGINT)  # as torchrun passes on a Ctrl-C
                yield x
        m.real_batches = faulty
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
            common.main_guard(m.main, flags + ["--out", str(out / fault), "--total-iters", "9"])
        said[fault] = err.getvalue()
    m.real_batches = real
    return said


SAMPLERS = {"epochs": None, "weighted": torch.arange(1.0, 11.0)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    return out


def max_diffs(a, b):
    """-> {net: max |a − b| over its tensors}."""
    return {k: max((a[k][n].double() - b[k][n].double()).abs().max().item() for n in a[k])
            for k in a}


@pytest.mark.parametrize("name", list(ITERATIONS))
def test_two_processes_equal_one_with_the_global_batch(two_processes, name):
    iteration, n, order = ITERATIONS[name]
    ranks = [torch.load(two_processes / f"{name}_rank{r}.pt") for r in range(WORLD)]
    for k, sd in ranks[0].items():  # one run, not N: both processes end with the same weights
        assert all(torch.equal(t, ranks[1][k][n]) for n, t in sd.items()), k
    one = iteration(order or list(range(n)), **({"per_process_d": True} if name == "04" else {}))
    diffs = max_diffs(ranks[0], one)
    print(f"\n{name}: 2 processes × {n // WORLD} vs 1 × {n}, max |Δ| per net: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs
    moved = max_diffs(ranks[0], iteration(list(range(n)), step=False))  # the step itself
    assert all(moved[k] > max(1000 * diffs[k], 1e-7) for k in moved), (moved, diffs)


def test_minibatch_stddev_groups_form_within_each_process(two_processes):
    """04 under torchrun: each process forms the stddev groups from its own batch, as the official
    code does per GPU. One process × 2B groups across the whole batch and trains otherwise."""
    two = torch.load(two_processes / "04_rank0.pt")
    whole_batch_groups = max_diffs(two, iteration_04(list(range(8))))
    assert whole_batch_groups["D"] > 1e-4, whole_batch_groups  # the layer really mixes samples


def test_errors_are_one_line_and_stop_every_rank(two_processes):
    said = [json.loads((two_processes / f"said_rank{r}.json").read_text()) for r in range(WORLD)]
    assert said[0]["global batch > data"] == (
        "--batch 2 × 2 processes = a global batch of 4, but the dataset has only 3 images; "
        "lower --batch, run fewer processes, or add images")
    assert said[0]["data < world"].startswith("2 processes cannot share 1 image(s)")
    # A data error on rank 1: both stop at once; rank 0 prints it once, naming the rank.
    assert said[0]["data"] == "error: rank 1: bad.png: cannot read this image\n"
    assert said[1]["data"] == ""
    assert torch.load(two_processes / "data" / "last.pt")["step"] == 2  # the last good one kept
    # Ctrl-C on rank 1 during step 3: every rank stops after step 2, rank 0 saves step 2.
    assert said[0]["ctrl_c"] == said[1]["ctrl_c"] == ""
    state = torch.load(two_processes / "ctrl_c" / "last.pt")
    assert state["step"] == 2 and state["world"] == 2
    lines = (two_processes / "ctrl_c" / "log.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]  # one log, rank 0's


def test_sampler_rows_of_two_processes_are_the_global_batch_and_resume_exactly(two_processes):
    said = [json.loads((two_processes / f"said_rank{r}.json").read_text())["sampler"]
            for r in range(WORLD)]
    for mode, weights in SAMPLERS.items():  # 10 images, global batch 4: 2 steps per epoch
        one = list(itertools.islice(datasets.StepSampler(10, 4, 5, 0, weights, name="x"), 7))
        assert [a + b for a, b in zip(said[0][mode], said[1][mode])] == [
            [list(item) for item in batch] for batch in one], mode  # (index, key) pairs
        resumed = list(itertools.islice(datasets.StepSampler(10, 4, 5, 3, weights, name="x"), 4))
        assert resumed == one[3:], mode
        if mode == "epochs":  # each image once per epoch
            for epoch in range(3):
                idx = [i for batch in one[2 * epoch:2 * epoch + 2] for i, _ in batch]
                assert len(set(idx)) == 8, idx
    other = list(itertools.islice(datasets.StepSampler(10, 4, 5, 0, name="y"), 7))
    assert other != one  # streams drawn side by side (02's sources and references) differ


# ---------------------------------------------------------------------------------------------
# The real entry point: torchrun, then a plain `python` resume.
# ---------------------------------------------------------------------------------------------
TOY = ["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16", "--log-every", "2",
       "--save-every", "2", "--sample-every", "4", "--device", "cpu"]


def test_torchrun_toy_run_then_one_process_resume(tmp_path, capsys):
    m, run = load_script("02_stargan_v2"), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), "02_stargan_v2.py", "--out", str(run), "--total-iters", "4", "--batch",
           "2", *TOY]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("oracle @ 4") == 1  # one console: rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one run folder
    assert sorted(p.name for p in run.iterdir()) == [".lock", "last.pt", "log.jsonl", "samples"]
    assert [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()] == [2, 4]
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["world"] == WORLD and saved["config"]["batch"] == 2
    # One process resumes it with the same global batch (--batch 4) and goes on from step 4.
    m.main(["--out", str(run), "--resume", "auto", "--total-iters", "6", "--batch", "4"])
    assert "was trained by 2 process(es) × batch 2 (global batch 4); now 1 × 4 = 4" \
        in capsys.readouterr().out
    resumed = torch.load(run / "last.pt", weights_only=True)
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert resumed["step"] == 6 and steps == [2, 4, 6] and resumed["world"] == 1
    # The same 6 steps in one process × 4 read the same samples and draw the same numbers
    # (exact: see the sampler test), so step 6 logs the same losses up to float32 summation
    # order (the processes and thread counts differ; after 6 Adam steps ≤ 3e-3 relative, measured).
    m.main(["--out", str(tmp_path / "one"), "--total-iters", "6", "--batch", "4", *TOY])
    logs = [json.loads((d / "log.jsonl").read_text().splitlines()[-1])
            for d in (run, tmp_path / "one")]
    assert logs[0].keys() == logs[1].keys() and logs[0]["step"] == 6
    for k in set(logs[0]) - {"step", "time"}:
        assert logs[0][k] == pytest.approx(logs[1][k], rel=1e-2), k


def test_torchrun_stop_signal_saves_once_at_one_step(tmp_path):
    """SIGTERM to torchrun, as SLURM or Kubernetes stop a job: torchrun passes it on, every process
    stops at the same step (agreed in next_batch), rank 0 saves that step and prints once how to
    continue. (torchrun itself then ends with its own traceback and status.)"""
    run = tmp_path / "run"
    flags = ["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16", "--batch", "2",
             "--num-workers", "0", "--device", "cpu", "--log-every", "1", "--save-every",
             "100000", "--sample-every", "100000", "--total-iters", "100000", "--out", str(run)]
    _, text, err = stop_with_signal(["02_stargan_v2.py", *flags], signal.SIGTERM, nproc=WORLD)
    said = re.findall(r"stopped by SIGTERM at step (\d+)", text)
    assert len(said) == 1, err[-3000:]  # one console: rank 0's
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["step"] == int(said[0]) >= 1 and saved["world"] == WORLD
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, saved["step"] + 1))
    assert f"torchrun --nproc_per_node {WORLD} 02_stargan_v2.py {' '.join(flags)} --resume auto" \
        in text

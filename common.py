"""Plumbing shared by the numbered scripts: errors, CLI, seeding and devices, several processes
(torchrun), the run folder and checkpoints, grids and logging. Nothing a paper names lives here.
The data side is under data/, which may import this module, never the reverse: the toy data and
its oracle (toy.py), dataset readers and step samplers (datasets.py), the FAN and face alignment
(fan.py), the metric backbones (metrics.py)."""
import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import textwrap
import threading
import time
import typing
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2


# ---- Errors: bad input is one line that names the file or flag and the fix, never a deep traceback
class UserError(Exception):
    pass


class SharedError(UserError):
    """Raised by every process at the same point: under torchrun rank 0 alone prints it."""


def require(cond, msg):
    if not cond:
        raise UserError(msg)


# Ctrl-C and a cluster's stops, SIGTERM (SLURM preemption or time limit, torchrun, Kubernetes) and
# SIGUSR1 (`sbatch --signal=USR1@SECONDS`), all stop a training loop alike: it saves, then exits.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}
# What a signal handler can reach: the signal that stopped us (by), those recorded under torchrun
# until every process agrees (pending), and the command line, to print how to continue.
_STOP = {"by": 0, "pending": [], "command": None}


def main_guard(fn, argv=None):
    """fn(argv) with one-line errors. Exit status: 0 done or stopped by Ctrl-C; 2 bad input or a
    failed save; 1 a lost peer; 128 + N when signal N stopped it, so a cluster requeues the job."""
    if argv is None:  # the command line (tests pass argv)
        _STOP["command"] = list(sys.argv)
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
                signal.signal(sig, _stop_once)
    rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    try:
        fn(argv)
    except UserError as e:  # one alike in every process is printed once, others name their rank
        alike = isinstance(e, SharedError) or not dist.is_initialized()
        if rank == 0 or not alike:
            print(f"error: {'' if alike or world == 1 else f'rank {rank}: '}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a training loop (which saves first): nothing to keep
        by = _STOP["by"] if _STOP["by"] != signal.SIGINT else 0
        print(f"stopped by {STOP_SIGNALS[by]}" if by else "interrupted", file=sys.stderr)
        sys.exit(128 + by if by else 130)
    except dist.DistError as e:  # a peer died or hung (TIMEOUT): its own message is above
        print(f"error: rank {rank}: lost contact with another process ({_first_line(e)})",
              file=sys.stderr)
        sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    if _STOP["by"] not in (0, signal.SIGINT):  # saved and reported (print_summary)
        sys.exit(128 + _STOP["by"])


def _stop_once(signum, frame):
    """The first stop signal stops the command; later ones are ignored so they cannot cut the
    checkpoint write short (Ctrl-\\ still kills)."""
    _STOP["by"] = signum
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def continue_command():
    """This process's command line with --resume auto in place of --resume / --overwrite."""
    if not _STOP["command"]:
        return None
    script, *args = _STOP["command"]
    keep = [a for i, a in enumerate(args) if a != "--overwrite" and a != "--resume" and not
            a.startswith("--resume=") and (i == 0 or args[i - 1] != "--resume")]
    n = os.environ.get("LOCAL_WORLD_SIZE", "1")
    launch = "python" if world_size() == 1 else f"torchrun --nproc_per_node {n}"
    return f"{launch} {shlex.join([script, *keep, '--resume', 'auto'])}"


# ---- CLI from a config dataclass: one flag per field, help = the field's trailing comment
def parse_config(cfg_cls, presets, argv=None, doc="", modes=("train",), extra=()):
    """-> (cfg, ns): defaults < preset < explicit flags (ns.given: the flags given)."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if len(modes) > 1:
        p.add_argument("mode", nargs="?", default=modes[0], choices=modes, help="what to do")
    p.add_argument("--preset", choices=sorted(presets),
                   help="named settings (default: from --data)")
    hints, comments = typing.get_type_hints(cfg_cls), {}
    for klass in reversed(cfg_cls.__mro__[:-1]):
        with contextlib.suppress(OSError, TypeError):  # no source file (a REPL): no help text
            pairs = re.findall(r"^[ \t]+(\w+)[ \t]*:[^#\n]*#[ \t]*(.*)$", inspect.getsource(klass),
                               re.MULTILINE)
            comments.update((name, text.strip()) for name, text in pairs)
    fields = dataclasses.fields(cfg_cls)
    for f in fields:
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")  # argparse
        seq = typing.get_origin(kind) in (tuple, list)
        flag = kind is bool or set(typing.get_args(kind)) == {bool, type(None)}  # bool | None
        kw = ({"action": argparse.BooleanOptionalAction} if flag else
              {"nargs": "+", "type": typing.get_args(kind)[0]} if seq else {"type": kind})
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        p.add_argument(*flags, default=argparse.SUPPRESS, dest=f.name, help=text, **kw)
    for flags, kw in extra:
        p.add_argument(*flags, **kw)
    ns = p.parse_args(argv)
    ns.mode = getattr(ns, "mode", modes[0])
    require(ns.mode == modes[0] or int(os.environ.get("WORLD_SIZE", 1)) == 1, f"{ns.mode}: runs "
            "in one process; start it with python, not torchrun (which is for training)")
    given = {f.name: getattr(ns, f.name) for f in fields if hasattr(ns, f.name)}
    data = str(given.get("data", ""))
    if ns.preset is None:  # a --data folder named like a preset, else toy for the toy data
        guess, toy = Path(data.rstrip("/")).name, data in ("", "toy") and "toy" in presets
        ns.preset = guess if guess in presets else ("toy" if toy else None)
    values, ns.given = {**presets.get(ns.preset, {}), **given}, tuple(given)
    workers = next((f.default for f in fields if f.name == "num_workers"), None)
    if workers is not None and "num_workers" not in given:  # more than the CPUs only compete
        values["num_workers"] = min(values.get("num_workers", workers), usable_cpus())
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), ns


def check_flags(cfg, positive="", nonneg="", unit=""):
    """Values torch would reject deep inside: one line naming the flag and its range. Each
    argument is a space-separated list of field names; a tuple's every item is checked."""
    rules = ((positive, lambda v: v > 0, lambda v: "≥ 1" if isinstance(v, int) else "> 0"),
             (nonneg, lambda v: v >= 0, lambda v: "≥ 0"),
             (unit, lambda v: 0 <= v < 1, lambda v: "in [0, 1)"))
    for names, ok, text in rules:
        for name in names.split():
            value = getattr(cfg, name)
            items = value if isinstance(value, tuple) else (value,)
            shown, each = " ".join(map(str, items)), "each " if isinstance(value, tuple) else ""
            require(all(math.isfinite(v) and ok(v) for v in items),
                    f"--{name.replace('_', '-')} {shown}: {each}must be {text(items[0])}")


# ---- Seeding, device, precision, CPU threads
def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def own_rng(device, seed=0):
    """Sample grids, figures and the oracle draw from generators seeded with seed (the same noise
    at every sample step), and Python's, the CPU's and the current GPU's training generators come
    back as they were: no --sample-every or --log-every changes the run."""
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    state = random.getstate()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # the current GPU's only
        try:
            yield
        finally:
            random.setstate(state)


def pick_device(name="auto"):
    if name == "auto":
        return use_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    require(re.fullmatch(r"cpu|cuda(:\d+)?", name),
            f"--device {name}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    n = torch.cuda.device_count() if device.type == "cuda" else 1
    require(n > (device.index or 0), f"--device {name}: " + (
        f"only {n} CUDA GPU(s) visible; use cuda:0..{n - 1}" if n else
        "no CUDA GPU is visible; use --device cpu (or auto)"))
    return use_device(device)


def use_device(device):
    """CUDA: the device becomes the current one (synchronize, memory counters and the saved RNG
    state act on the GPU that trains), and fp32 means IEEE fp32: cuDNN and matmul would use TF32
    (a 10-bit mantissa), which the papers' GPUs lacked. bf16 autocast is the fast path."""
    if device.type == "cuda":
        if device.index is None:  # set_device wants an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def usable_cpus():
    """The CPUs this process may run on (taskset, a container's or a job's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def autocast(device, amp):
    """bf16 autocast. amp None: on CUDA only (the CPU keeps the faithful fp32); True: on the CPU
    too; False: fp32."""
    kind = torch.device(device).type
    on = (kind == "cuda") if amp is None else amp and kind in ("cuda", "cpu")
    return torch.autocast(kind, dtype=torch.bfloat16) if on else contextlib.nullcontext()


# torch's OpenMP threads spin-wait at every barrier, so one that shares its core with another
# program holds up the rest: beside one busy process on 2 cores the toy benches ran 6-24× slower
# with 2 threads and at their 1-thread speed with 1; alone, 2 threads are 1.2-1.6× faster.
_CPU = {"last": None, "most": None}


def _cpu_seconds():
    """-> (time, busy seconds of the CPUs this process may use, this process's CPU seconds, how
    many CPUs), from /proc; None where there is none (macOS, Windows, some containers)."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            rows = [r for r in map(str.split, f) if r and r[0] in cpus]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()[11:13]  # utime, stime (all threads)
    except (OSError, AttributeError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = sum(int(v) for r in rows for i, v in enumerate(r[1:9]) if i not in (3, 4))  # not idle
    return (time.monotonic(), busy / tick, sum(map(int, own)) / tick, len(rows)) if rows else None


def fit_threads(every=3.0):
    """Once a step (next_batch), acting every `every` seconds: torch's intra-op threads become the
    CPUs other programs left free since the last look (at least 1, at most torch's default). Off
    when OMP_NUM_THREADS is set (torchrun sets 1): a run whose thread count changes is not
    bit-reproducible, as float sums split differently, so pin it there for that."""
    last = _CPU["last"]
    if os.environ.get("OMP_NUM_THREADS") or last and time.monotonic() - last[0] < every:
        return
    now = _cpu_seconds()
    _CPU["last"] = now or (math.inf,)  # no /proc here: never look again
    if not (now and last):
        _CPU["most"] = _CPU["most"] or torch.get_num_threads()
        return
    others = ((now[1] - last[1]) - (now[2] - last[2])) / max(now[0] - last[0], 1e-3)  # CPUs
    n, was = max(1, min(_CPU["most"], round(now[3] - others))), torch.get_num_threads()
    if n != was:
        print(f"CPU threads {was} -> {n}: other programs kept {others:.1f} of the {now[3]} CPUs "
              "busy (set OMP_NUM_THREADS to pin the count)", flush=True)
        torch.set_num_threads(n)


# ---- Several processes: torchrun starts one per GPU (or several on the CPU); one run, not N.
# In a plain run (no torchrun, or one process) every helper below does nothing: world size 1.
# Batch: --batch is per process, the global batch N × --batch, and no lr or schedule scaling is
#   applied: every schedule counts steps (λ_ds over --ds-iter, the EMA's β per step), so keeping
#   the default batch on N GPUs trains on N times the paper's images. Batch-dependent details: 03's
#   KL term is summed over the batch (official), so its weight grows with the global batch; 04's
#   minibatch-stddev groups form within each process (as official multi-GPU StyleGAN) and its EMA
#   half-life and w̄ follow the global batch's images.
# One run: all processes build the same weights from the same seed (checked at the start); the
#   console, log.jsonl (losses averaged over processes), samples and last.pt come from rank 0. A
#   checkpoint resumes at any N, exactly when the global batch is the same: each step's samples,
#   flips, crops and random draws (z, mixing, α, dropout masks, noise) are drawn for the global
#   batch from the seed and the step (shard_draw), each process keeping its rows.
# Gradients: one explicit all-reduce per optimizer step (average_gradients), not DDP, whose reducer
#   expects each wrapped parameter to get a gradient in every backward; these GANs use several
#   optimizers, backward passes into some nets only, double backwards (R1, WGAN-GP) and functional
#   calls. tests/test_distributed.py checks that 2 processes × B end an iteration with the weights
#   of 1 process × 2B (float64, ≤ 4e-8 apart).
# Several machines: the same code and data paths on each, port 29500 of the rendezvous host open,
#   --out on a shared filesystem (every process reads last.pt on resume). Faults stop every
#   process: a stop signal at the same step (rank 0 saves), a data error or non-finite loss with one
#   `error:` line (torchrun's own traceback follows it), a dead peer after TIMEOUT in a collective.
TIMEOUT = datetime.timedelta(minutes=10)  # a dead or stuck peer stops the others, never a hang;
# rank 0's longest lone work (sample grids, the toy oracle, a checkpoint write) is far shorter
_PEERS = {}  # set once by init_distributed: the CPU control group


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def init_distributed(device="auto"):
    """-> this process's device. Under torchrun: joins the process group, NCCL on cuda:LOCAL_RANK
    or gloo on the CPU (--device cpu, or no GPU). Otherwise pick_device."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return pick_device(device)
    local, n = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    cuda = device != "cpu" and n > 0
    require(device in ("auto", "cpu", "cuda") and (cuda or device != "cuda"), f"--device "
            f"{device}: under torchrun each process takes cuda:LOCAL_RANK ({n} GPUs visible) or "
            "the CPU; pass --device auto, cuda or cpu")
    require(not cuda or local < n, f"torchrun started {local + 1}+ processes on this machine but "
            f"only {n} GPU(s) are visible; pass --nproc_per_node {n} or fewer")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        use_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                device_id=device if cuda else None)
        # The per-step stop flags travel between CPUs: on NCCL each step would wait for its GPU.
        _PEERS.update(control=dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else None)
        # Stop signals are only recorded: all processes stop at the same step (next_batch), so
        # rank 0 saves a state no process has moved past.
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, _: _STOP["pending"].append(signum))
        if dist.get_rank() > 0:  # one console: rank 0's (errors: see main_guard)
            sys.stdout = open(os.devnull, "w")
    return device


def _agree(problem=""):
    """Every process tells whether it met a problem (a message) or got a stop signal; then all
    raise the lowest rank's problem as a SharedError, or KeyboardInterrupt, together."""
    if world_size() == 1:
        return
    group, pending = _PEERS.get("control"), _STOP["pending"]
    flags = torch.tensor([bool(problem), max(pending, default=0)], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if flags[0]:
        said = [None] * world_size()
        dist.all_gather_object(said, problem, group=group)
        first = next(r for r, p in enumerate(said) if p)
        raise SharedError(f"rank {first}: {said[first]}")
    if flags[1]:
        pending.clear()
        _STOP["by"] = int(flags[1])
        raise KeyboardInterrupt


def next_batch(stream):
    """next(stream), once a step. Under torchrun all processes stop at this step if one could not
    read its share (a UserError) or got a stop signal: one small CPU collective."""
    fit_threads()
    if world_size() == 1:
        return next(stream)
    try:
        item, problem = next(stream), ""
    except UserError as e:
        item, problem = None, str(e)
    _agree(problem)
    return item


def shard_draw(draw, n, dim=0):
    """draw(N·n) -> this process's n rows along dim (of a tensor, or of each in a list). Every
    process holds the same RNG state, so N processes × n get the numbers 1 process × N·n gets."""
    world, r = world_size(), rank()
    out = draw(n * world)
    if world == 1:
        return out
    take = lambda t: t.narrow(dim, r * n, n)  # noqa: E731
    return [take(t) for t in out] if isinstance(out, (list, tuple)) else take(out)


def gather_batch(x):
    """x (n, ...) of every process, in rank order -> (N·n, ...)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def mean_over_ranks(x):
    """A tensor, or a dict of scalars (logged losses), averaged over all processes."""
    if world_size() == 1 or (isinstance(x, dict) and not x):
        return x
    if isinstance(x, dict):
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = torch.stack([torch.as_tensor(v).detach().float().to(device) for v in x.values()])
        return dict(zip(x, mean_over_ranks(flat)))
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def average_gradients(*optimizers):
    """Before optimizer.step() under torchrun: the gradients these optimizers step, averaged over
    all processes in one flat all-reduce (why not DDP: see above). A parameter without a gradient
    stays without one on every process, so its optimizer skips it, as in a plain run."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for o in optimizers for group in o.param_groups for p in group["params"]
             if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


def check_same_weights(nets):
    """One run, not N: at the start every process holds rank 0's weights."""
    if world_size() == 1:
        return
    differ = ""
    for name, net in nets.items():
        for key, t in net.state_dict().items():
            theirs = t.detach().clone()
            dist.broadcast(theirs, 0)
            differ = differ or (f"{name}.{key}" if not torch.equal(theirs, t) else "")
    _agree(differ and f"its initial weights differ from rank 0's ({differ}); every process must "
           "use the same --seed and resume the same checkpoint (several machines: put --out on "
           "a shared filesystem)")


# ---- Run folder and checkpoints: one file holds the whole training state
# Settings of this invocation and machine, not of the run: never taken from a checkpoint.
LOCAL = ("out", "resume", "overwrite", "device", "bench", "bench_iters", "num_workers")


def prepare_run(cfg, given=(), fixed=()):
    """-> (cfg, checkpoint to resume or None). Every check comes before the folder changes: a run
    in cfg.out is continued (--resume auto, or its last.pt by path) or, with --overwrite, moved
    aside; never replaced. Under torchrun rank 0 alone does this and tells the others."""
    if world_size() == 1:
        return _prepare_run(cfg, given, fixed)
    answer = [None]
    if is_main():
        try:
            new, ckpt = _prepare_run(cfg, given, fixed)
            answer = [(dataclasses.asdict(new), ckpt, "")]
        except UserError as e:
            answer = [(None, None, str(e))]
    dist.broadcast_object_list(answer, 0, group=_PEERS.get("control"))
    values, ckpt, problem = answer[0]
    if problem:
        raise SharedError(problem)
    return type(cfg)(**values), ckpt


def _prepare_run(cfg, given, fixed):
    out, resume = Path(cfg.out), cfg.resume
    last = out / "last.pt"
    require(not out.exists() or out.is_dir(), f"--out {out}: is a file, not a folder; pass a "
            "folder for the run (it is made if missing)")
    if out.is_dir():  # first: a second start in a folder in use stops here, before any check
        _lock_run(out)
    ckpt = Path(resume) if resume not in ("", "auto") else None
    ckpt = last if resume == "auto" and last.exists() else ckpt
    require(ckpt is None or ckpt.is_file(), f"--resume {resume}: no such checkpoint file; use "
            "--resume auto to continue the run in --out, or leave it out to start fresh")
    own = ckpt is not None and last.exists() and ckpt.resolve() == last.resolve()
    require(own or not last.exists() or cfg.overwrite, (
        f"--resume {ckpt} would continue in {out}, which already holds a run ({last}); pass "
        "--overwrite to move that run aside, --resume auto to continue it instead, or another "
        "--out") if ckpt else (f"{out} already holds a run ({last}); pass --resume auto to "
                               "continue it, --overwrite to start over, or another --out"))
    cfg = resume_config(cfg, ckpt, given, fixed) if ckpt else cfg
    if cfg.overwrite and not own and any((out / n).exists() for n in ("last.pt", "log.jsonl")):
        ckpt = _move_aside(out, ckpt)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, a read-only filesystem
        raise UserError(f"--out {out}: cannot make this folder ({e.strerror}: {e.filename}); pass "
                        "a folder you can write to") from None
    _lock_run(out)
    Path(f"{last}.tmp").unlink(missing_ok=True)  # left by a process killed while saving
    return cfg, ckpt


_LOCKS = {}  # run folder -> its open lock file, held by this process until it ends


def _lock_run(out):
    """One run per folder: an exclusive flock on out/.lock, which the OS releases when the process
    ends in any way (SIGKILL too). The file names the holder for a second start's refusal."""
    if out.resolve() in _LOCKS:  # held already (a second run in one process: tests)
        return
    try:
        f = open(out / ".lock", "a+")  # a+: never truncated before the lock is ours
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in this folder ({e.strerror}); pass a folder "
                        "you can write to") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "starting up"
        f.close()
        raise UserError(f"--out {out}: another run is using this folder ({holder}); wait for it "
                        "to end or stop it, or pass another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    f.flush()
    _LOCKS[out.resolve()] = f


def _move_aside(out, ckpt):
    """--overwrite: out -> out.old-N (the first free N); nothing is deleted. -> ckpt's new path."""
    require(not Path.cwd().resolve().is_relative_to(out.resolve()), f"--out {out}: --overwrite "
            "would move the folder you are working in; pass a run folder such as runs/<name>")
    n = 1
    while (aside := out.with_name(f"{out.name}.old-{n}")).exists():
        n += 1
    inside = ckpt is not None and ckpt.resolve().is_relative_to(out.resolve())
    moved = aside / ckpt.resolve().relative_to(out.resolve()) if inside else ckpt
    lock = _LOCKS.pop(out.resolve(), None)  # its lock goes with it; out is locked anew
    out.rename(aside)
    if lock:
        lock.close()
    print(f"--overwrite: moved the previous run {out} to {aside} (delete it once not needed)")
    return moved


def resume_config(cfg, path, given=(), fixed=()):
    """The config a resumed run trains with (run_config); each applied flag is printed."""
    state = read_checkpoint(path, type(cfg))
    cfg, applied = run_config(cfg, state["config"], path, given, fixed)
    for k, old, new in applied:
        print(f"resume: {k} {old} -> {new} (applied)")
    saved, was, world = state["config"], state.get("world", 1), world_size()  # who wrote it
    if was != world and "batch" in saved:  # --batch is per process
        print(f"resume: {path} was trained by {was} process(es) × batch {saved['batch']} (global "
              f"batch {was * saved['batch']}); now {world} × {cfg.batch} = {world * cfg.batch}")
    return cfg


def run_config(cfg, saved, path, given=(), fixed=()):
    """The one rule for what a checkpoint fixes (resume, sample, eval): a run keeps its saved
    settings, except the LOCAL ones and the flags this command gives, which apply. A given flag
    that changes one of `fixed` (architecture, data: the weights would not fit or would mean
    something else) is refused; a moved copy of the data (same folder name) is applied.
    -> (cfg, [(name, saved value, applied value)])"""
    values, applied = {}, []
    for k, old in saved.items():
        old = tuple(old) if isinstance(old, list) else old  # torch.load gives tuples back as lists
        new, flag = getattr(cfg, k), k.replace("_", "-")
        if k in LOCAL or old == new:
            continue
        if k not in given:
            values[k] = old
            continue
        moved = k.startswith("data") and Path(old or "toy").name == Path(new or "toy").name
        require(k not in fixed or moved, f"--{flag} {new}: {path} was trained with {k} {old}; a "
                f"run keeps its architecture and data: leave --{flag} out, or start a new run "
                "(another --out)")
        applied.append((k, old, new))
    return dataclasses.replace(cfg, **values), applied


def load_run(cfg, ckpt, build, given=(), fixed=(), official=None):
    """sample / eval -> (cfg, nets, extra) of the run in ckpt (default <out>/last.pt), its config
    by run_config; --out, when not given, becomes the checkpoint's folder. build(cfg, extra) ->
    {name: net}. official(path, nets) loads a released file (no settings inside) into nets built
    from this command's cfg; without it such a file is refused."""
    path = Path(ckpt or Path(cfg.out) / "last.pt")
    require(path.is_file(), f"{path}: no such checkpoint; train first, or pass --ckpt FILE")
    state = read_checkpoint(path, type(cfg), ours=official is None)
    if not {"nets", "config"} <= state.keys():  # a released file
        return cfg, official(path, build(cfg, {})), {}
    cfg, extra = run_config(cfg, state["config"], path, given, fixed)[0], state.get("extra", {})
    cfg = cfg if "out" in given else dataclasses.replace(cfg, out=str(path.parent))
    nets = build(cfg, extra)
    _load_checkpoint(path, nets, None, "cpu", restore_rng=False, state=state)
    return cfg, nets, extra


def strip_prefixes(state_dict):
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def _first_line(e):  # the first sentence of an exception: torch's can run to several lines
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:200]


def read_checkpoint(path, cfg_cls=None, ours=True, map_location="cpu"):
    """torch.load with one-line errors naming the file: missing, empty, truncated, not a torch
    file, or (cfg_cls) another script's checkpoint. ours=False: plain state dicts pass too."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # EOFError, zip errors, unpickling: all mean a broken or foreign file
        raise UserError(f"{path}: cannot read this checkpoint ({_first_line(e)}); it is empty, "
                        "truncated or not a torch file") from None
    mine = isinstance(state, dict) and {"nets", "config"} <= state.keys()
    fields = {f.name for f in dataclasses.fields(cfg_cls)} if cfg_cls else set()
    alien = sorted(set(state["config"]) - fields) if mine and cfg_cls else []
    why = f"its settings include {', '.join(alien[:3])}" if alien else "no training state inside"
    require(isinstance(state, dict) and (mine or not ours) and not alien, f"{path}: not a "
            f"checkpoint of this script ({why}); pass a last.pt written by this script")
    return state


@contextlib.contextmanager
def _signals_held(deliver=True):
    """Stop signals inside are recorded, so a write is never cut short; on leaving, the first is
    delivered (deliver) or dropped. Only the main thread may set handlers."""
    if threading.current_thread() != threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    hits, held = [], [sig for sig, h in before.items() if h not in (None, signal.SIG_IGN)]
    for sig in held:
        signal.signal(sig, lambda signum, _: hits.append(signum))
    try:
        yield
    finally:
        for sig in held:
            signal.signal(sig, before[sig])
    if hits and deliver:
        signal.raise_signal(hits[0])


def save_checkpoint(path, step, cfg, nets, opts, extra=None, losses=None, interrupted=False,
                    last_good=None):
    """Never replaces the last good checkpoint with a broken one: finite losses and tensors only,
    written whole (temp file, fsync, rename) with stop signals held (interrupted: this save
    answers one, later ones are dropped). A failed write stops every process with one line.
    last_good: the checkpoint the messages name as kept (default path)."""
    last_good = last_good or path
    with _signals_held(deliver=not interrupted):
        # Every process checks (losses synced, weights alike), so all stop together.
        check_finite(mean_over_ranks(losses or {}), step, last_good)
        # CUDA: the state of the GPU this process trains on (use_device made it current)
        cuda = [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else []
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}
        state = {"step": step, "config": dataclasses.asdict(cfg), "rng": rng,
                 "extra": extra or {}, "opts": {k: o.state_dict() for k, o in opts.items()},
                 "nets": {k: strip_prefixes(m.state_dict()) for k, m in nets.items()},
                 "world": world_size()}
        tensors = [(f"{k}.{n}", t) for k, sd in state["nets"].items() for n, t in sd.items()] + [
            (f"the {k} optimizer's {n}", t) for k, o in state["opts"].items()
            for s in o["state"].values() for n, t in s.items() if torch.is_tensor(t)]
        bad = next((n for n, t in tensors if t.is_floating_point() and not t.isfinite().all()),
                   None)
        if bad is not None:
            _stop_broken(step, f"{bad} is not finite", last_good)
        said = [_write_checkpoint(state, Path(path), last_good) if is_main() else ""]
        if world_size() > 1:  # rank 0 alone writes; if it could not, every process stops
            dist.broadcast_object_list(said, 0, group=_PEERS.get("control"))
        if said[0]:
            raise SharedError(f"step {step}: {said[0]}")


def _write_checkpoint(state, path, last_good):
    """torch.save to path.tmp, fsync (a quota or a network filesystem may refuse the data only
    then), rename over path. -> "" or why it failed; no .tmp is left behind."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return ""
    except (OSError, RuntimeError) as e:  # torch's writer raises RuntimeError from the OSError
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        why = cause.strerror if cause is not None and cause.strerror else _first_line(e)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**30:.2f} GiB free there"
        except OSError:
            free = "free space unknown"
        return (f"cannot write the checkpoint {path} ({why}; {free}); stopping. The last good "
                f"checkpoint, {_last_good(last_good)}, is untouched: make room (or fix the "
                "folder), then continue with --resume auto")
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, nets, opts=None, map_location="cpu", restore_rng=True):
    """Nets, optimizer state and RNG from path. The optimizers keep this run's lr, betas, eps and
    weight decay (see run_config). Under torchrun, if one process cannot read it, all stop."""
    if world_size() == 1:
        return _load_checkpoint(path, nets, opts, map_location, restore_rng)
    try:
        state, problem = _load_checkpoint(path, nets, opts, map_location, restore_rng), ""
    except UserError as e:
        state, problem = None, f"{e} (several machines: put --out on a shared filesystem)"
    _agree(problem)
    return state


def _load_checkpoint(path, nets, opts, map_location, restore_rng, state=None):
    state = state or read_checkpoint(path, map_location=map_location)
    try:
        for k, m in nets.items():
            m.load_state_dict(strip_prefixes(state["nets"][k]))
        for k, o in (opts or {}).items():
            keep = [{n: g[n] for n in ("lr", "betas", "eps", "weight_decay") if n in g}
                    for g in o.param_groups]
            o.load_state_dict(state["opts"][k])
            for group, settings in zip(o.param_groups, keep):
                group.update(settings)
    except Exception as e:  # missing keys, shape mismatch: another script's or layout's file
        raise UserError(f"{path}: not a checkpoint of this script ({_first_line(e)})") from None
    if restore_rng:
        restore_rng_state(state["rng"])
    return state


def restore_rng_state(rng):
    """The saved RNG states, as the CPU byte tensors torch's setters want (whatever map_location
    read). CUDA: the current GPU takes the first saved state (older files hold one per GPU)."""
    version, internal, gauss = rng["python"]  # setstate wants tuples, not lists
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][0].cpu())


def _last_good(path):
    return path if path and Path(path).exists() else "none yet"


def _stop_broken(step, what, last):  # shared: the losses are synced, the weights alike
    raise SharedError(f"step {step}: {what}; stopping without saving. Last good checkpoint: "
                      f"{_last_good(last)} (try a lower lr, or --no-amp)")


def check_finite(losses, step, last_ckpt=None):
    """Stops at a nan/inf loss term (at every log step and before every save)."""
    for k, v in losses.items():
        if not math.isfinite(float(v)):
            _stop_broken(step, f"loss term '{k}' is {float(v)}", last_ckpt)


def check_save(path, step, cfg, nets, opts, extra=None):
    """Before the first step: a whole checkpoint is written beside path, read back and removed,
    so an unwritable --out, a full disk or a state that cannot be reloaded shows now."""
    probe, problem = Path(f"{path}.tmp"), ""  # the name prepare_run clears if we are killed
    try:
        save_checkpoint(probe, step, cfg, nets, opts, extra, last_good=path)
        if is_main():
            read_checkpoint(probe, type(cfg))
    except OSError as e:
        why = e.strerror or type(e).__name__
        problem = (f"--out {Path(path).parent}: cannot write a checkpoint there ({why}); free "
                   "some space, fix the permissions, or pass another --out")
    except UserError as e:
        problem = str(e)
    finally:
        if is_main():
            probe.unlink(missing_ok=True)
    _agree(problem)  # torchrun: every process stops here together
    require(not problem, problem)


class SaveTimer:
    """due(step): write last.pt now? Every `every` steps, at the last step, and once `minutes` of
    wall time (0: never) have passed since the last save. Under torchrun rank 0's clock decides,
    told to the others at the log steps."""
    clock = staticmethod(time.monotonic)  # tests patch it

    def __init__(self, every, minutes, total, log_every):
        self.every, self.seconds, self.total, self.log_every = every, minutes * 60, total, log_every
        self.t0 = self.clock()

    def due(self, step):
        now = self.clock()
        late = self.seconds > 0 and now - self.t0 >= self.seconds
        if world_size() > 1:
            flag = torch.tensor([int(late and not step % self.log_every)])
            if not step % self.log_every:
                dist.broadcast(flag, 0, group=_PEERS.get("control"))
            late = bool(flag)
        if late or step % self.every == 0 or step == self.total:
            self.t0 = now
            return True
        return False


def report_crash(e, step, last):
    """An unexpected error (a bug; not bad input, a nan or a lost peer, which have their own
    lines) in a training loop: one line naming the step and the last good checkpoint, before
    the caller re-raises it with its traceback."""
    if isinstance(e, (UserError, dist.DistError)):
        return
    where = f"rank {rank()}: " if world_size() > 1 else ""
    age = f" (saved {duration(time.time() - Path(last).stat().st_mtime)} ago; --resume auto " \
        "goes on from it)" if Path(last).exists() else ""
    print(f"error: {where}{type(e).__name__} after step {step}; nothing was saved since. Last "
          f"good checkpoint: {_last_good(last)}{age}. Traceback, for a bug report:",
          file=sys.stderr, flush=True)


def start_line(cfg, device, step, *parts):
    """A training run's first line: what, where, from which step, loader workers, processes."""
    world = [f"{world_size()} processes × batch {cfg.batch}"] if world_size() > 1 else []
    return " | ".join([*parts, f"device {device}", f"from step {step}", f"{cfg.num_workers} "
                       f"loader workers ({usable_cpus()} CPUs)", *world])


# ---- Output: grids, GIFs, console and JSONL logging, loss curves, the end-of-run summary
def sig3(x):
    """x with 3 significant digits and no exponent (bench lines): 0.0123, 4.56, 78.9, 2160."""
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if x else "0"


class _Totals(contextlib.nullcontext):
    parents = ("Global",)  # every FLOP counts toward the total, none toward a module


def flop_counter():
    """torch's FlopCounterMode without its module tracker, whose input hooks break autograd.grad
    with respect to a leaf (R1, WGAN-GP): --bench needs totals only."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Totals()
    return counter


def zoom_for(side):
    """Nearest-neighbour factor that brings a side under 64 px to 64 px or more (8 px ×8)."""
    return max(1, -(-64 // side))


def save_grid(images, path, nrow, rows=(), cols=()):
    """images (N, 3, H, W) in [-1, 1] -> a PNG/JPEG grid, nrow per row; rows / cols: labels
    left of each row / above each column."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    if (k := zoom_for(images.shape[-1])) > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=k, mode="nearest")
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1, normalize=True,
                                       value_range=(-1, 1))
    img = v2.functional.to_pil_image(grid.mul(255).add(0.5).clamp(0, 255).byte())
    if rows or cols:
        font, side, top = _font(12), images.shape[-1] + 1, 18 * bool(cols)  # a cell + padding
        left = max((int(font.getlength(t)) + 8 for t in rows), default=0)
        framed = Image.new("RGB", (img.width + left, img.height + top), "white")
        framed.paste(img, (left, top))
        draw = ImageDraw.Draw(framed)
        for i, text in enumerate(rows):
            draw.text((left - 4, top + side * i + side // 2), text, "black", font, "rm")
        for j, text in enumerate(cols):
            draw.text((left + side * j + side // 2, 9), text, "black", font, "mm")
        img = framed
    img.save(path)


def save_gif(frames, path, duration_ms=100):
    """frames: list of (3, H, W) in [-1, 1] -> a looping GIF, enlarged as save_grid does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    u8 = [((f.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte() for f in frames]
    k = zoom_for(u8[0].shape[1])
    u8 = [u.repeat_interleave(k, 1).repeat_interleave(k, 2) for u in u8]
    pil = [v2.functional.to_pil_image(u).convert("P", palette=Image.Palette.ADAPTIVE) for u in u8]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)


def clock(seconds):
    """h:mm:ss with unbounded hours (a long run's ETA runs to days)."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def duration(seconds):
    """42 s, 9 min 41 s, 3 h 05 min."""
    s = round(seconds)
    return (f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else
            f"{s // 3600} h {s // 60 % 60:02d} min")


def short_path(path):
    """path relative to the working directory when it lies below it (commands to copy)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


class Logger:
    """Every `every` steps: one console line of at most 120 columns (step, it/s, ETA, then the
    `show` terms {label: key or function of the values}, default all that fit) and every term
    as a JSON line in out/log.jsonl. The clock starts at step `start`, where this process starts."""
    WIDTH = 120

    def __init__(self, out, total, every, show=None, panels=None, start=0):
        self.path, self.total, self.every, self.show = Path(out) / "log.jsonl", total, every, show
        self.panels, self.step0, self.t0 = panels, start, time.time()
        if is_main():
            set_aside_log_past(self.path, start)

    def line(self, step, vals):
        rate = (step - self.step0) / max(time.time() - self.t0, 1e-9)
        eta = clock((self.total - step) / rate) if rate > 0 else "-"
        line = f"step {step}/{self.total} | {sig3(rate)} it/s | ETA {eta} |"
        for label, key in (self.show or {k: k for k in vals}).items():
            try:
                term = f" {label} {key(vals) if callable(key) else vals[key]:.3g}"
            except KeyError:  # not logged at this step (e.g. G steps every n_critic D steps)
                continue
            if len(line) + len(term) > self.WIDTH:  # log.jsonl has every term
                break
            line += term
        return line

    def log(self, step, losses):
        if not is_main():  # one run, one log: rank 0 writes (the caller synced the losses)
            return
        vals = {k: float(v) for k, v in losses.items()}  # the only host sync of a training step
        with _signals_held():  # a stop then saves this step: its line must be in the log, whole
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "time": round(time.time(), 3), **vals}) + "\n")
            print(self.line(step, vals), flush=True)

    def plot(self, path):
        return plot_log(self.path, path, self.panels)


def set_aside_log_past(path, step):
    """log.jsonl holds the run's history once: lines past `step` (where this run starts; 0 fresh)
    came from a run that stopped before its next save and would be logged twice. They leave
    log.jsonl, as does a line cut short by a kill; the previous file is kept as log.jsonl.old-N."""
    def step_of(line):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["step"])

    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    keep = [ln for ln in lines if step and (s := step_of(ln)) is not None and s <= step]
    if len(keep) == len(lines) and text.endswith("\n") or not text:
        return
    n = 1
    while (old := path.with_name(f"{path.name}.old-{n}")).exists():
        n += 1
    shutil.copyfile(path, old)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)  # never half a log
    print(f"{short_path(path)}: {len(lines) - len(keep)} line(s) past step {step}, where this run "
          f"starts, set aside (the previous log is kept as {old.name})")


def read_log(path):
    """log.jsonl -> {step: {term: value}}, the last line of a step winning, cut lines skipped."""
    rows, path = {}, Path(path)
    for text in (path.read_text() if path.exists() else "").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            row = json.loads(text)
            step = int(row.pop("step"))
            rows[step] = {k: v for k, v in row.items() if k != "time"}
    return dict(sorted(rows.items()))


def _font(size):
    try:
        return ImageFont.load_default(size)  # Pillow ≥ 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127)]


def plot_log(log_path, png_path, panels=None, width=720):
    """The logged curves as a PNG (Pillow only): a panel per network (panels {title: keys};
    default the key's prefix, 'D/adv' -> D), a strip per term on the y range of its last 90 % of
    points (an early spike does not flatten the rest), with its range and last value."""
    rows = read_log(log_path)
    steps, keys = list(rows), list(dict.fromkeys(k for r in rows.values() for k in r))
    if panels is None:
        panels = {}
        for k in keys:
            panels.setdefault(k.split("/")[0] if "/" in k else "other", []).append(k)
    panels = {t: ks for t, ks in ((t, [k for k in ks if k in keys]) for t, ks in panels.items())
              if ks}
    strip, x0, x1 = 46, 230, width - 12
    height = 30 + sum(44 + strip * len(ks) for ks in panels.values())
    img = Image.new("RGB", (width, height), "white")
    draw, big, small = ImageDraw.Draw(img), _font(15), _font(12)
    span = f"steps {steps[0]}-{steps[-1]}, {len(steps)} points" if steps else "nothing logged yet"
    draw.text((8, 6), f"{Path(log_path).parent.name}: losses ({span})", "black", big)
    y, color = 30, iter(_COLORS * 10)
    for title, ks in panels.items():
        draw.text((8, y + 4), title, "black", big)
        y += 24
        for k in ks:
            pts = [(s, r[k]) for s, r in rows.items() if k in r and math.isfinite(r[k])]
            _strip(draw, pts, k, next(color), (x0, y + 4, x1, y + strip - 6), steps, small)
            y += strip
        for frac, anchor in ((0, "la"), (0.5, "ma"), (1, "ra")):  # the step axis
            s = steps[0] + frac * (steps[-1] - steps[0]) if steps else 0
            draw.text((x0 + frac * (x1 - x0), y - 4), f"{s:.0f}", (90, 90, 90), small, anchor)
        y += 20
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(png_path)
    return png_path


def _strip(draw, pts, name, color, box, steps, font):
    """One term: name and last value left, range beside the box; per pixel column the mean, and
    the min-max span in a light tint; a dotted line at 0 when in range."""
    bx0, by0, bx1, by1 = box
    draw.rectangle(box, outline=(200, 200, 200))
    draw.text((8, by0), name, color, font)
    if not pts:
        return draw.text((8, by0 + 16), "no finite value", (150, 150, 150), font)
    vals = [v for _, v in pts[len(pts) // 10:]]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-9:  # a constant term: a flat line in the middle
        lo, hi = lo - abs(lo) * 0.05 - 1e-6, hi + abs(hi) * 0.05 + 1e-6
    draw.text((8, by0 + 16), f"last {pts[-1][1]:.4g}", (60, 60, 60), font)
    draw.text((bx0 - 6, by0 - 2), f"{hi:.3g}", (90, 90, 90), font, "ra")
    draw.text((bx0 - 6, by1 + 2), f"{lo:.3g}", (90, 90, 90), font, "rd")
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
    px = lambda s: round(bx0 + (s - s0) / (s1 - s0) * (bx1 - bx0))  # noqa: E731
    py = lambda v: by1 - (min(max(v, lo), hi) - lo) / (hi - lo) * (by1 - by0)  # noqa: E731
    if lo < 0 < hi:
        for x in range(bx0, bx1, 6):
            draw.line([(x, py(0)), (x + 2, py(0))], (150, 150, 150))
    cols = {}
    for s, v in pts:
        cols.setdefault(px(s), []).append(v)
    tint = tuple(int(c + (255 - c) * 0.65) for c in color)
    line = []
    for x, vs in sorted(cols.items()):
        draw.line([(x, py(min(vs))), (x, py(max(vs)))], tint)
        line.append((x, py(sum(vs) / len(vs))))
    draw.line(line, color, 2) if len(line) > 1 else draw.ellipse(
        [line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], color)


def print_summary(script, step, start, seconds, files, oracle=(), commands=(), stopped=False,
                  after=(0, "")):
    """The last lines of every training run: steps and wall time, the outputs [(label, [paths])]
    (a path in the folder of the one before it shows its name; missing ones are left out), the
    oracle's lines, the next commands [(command, why)]. after = (seconds, what): time spent after
    the last step (figures, the oracle). -> the text"""
    done = f"stopped by {STOP_SIGNALS.get(_STOP['by'], 'Ctrl-C')} at" if stopped else "done:"
    if stopped and continue_command():  # the same command goes on from last.pt
        commands = [(continue_command(), "continue from here"), *commands]
    since = f", resumed from step {start}" if start else ""
    more = f"; {what} {duration(s)}" if (s := after[0]) >= 1 and (what := after[1]) else ""
    lines = [f"== {script} {done} step {step}: {step - start} steps in {duration(seconds)}{since}"
             f"{more}"]

    def row(label, text):
        lines.extend(textwrap.wrap(text, 120, initial_indent=f"{label:<12}",
                                   subsequent_indent=" " * 12, break_on_hyphens=False,
                                   break_long_words=False))

    for label, paths in files:
        names, folder = [], None
        for p in (Path(p) for p in paths if Path(p).exists()):
            names.append(p.name if p.parent == folder else short_path(p))
            folder = p.parent
        if names:
            row(label, " ".join(names))
    for i, text in enumerate([oracle] if isinstance(oracle, str) else oracle):
        row("oracle" if i == 0 else "", text)
    width = max((len(c) for c, _ in commands), default=0)
    aligned = all(12 + width + 4 + len(why) <= 120 for _, why in commands)
    for i, (command, why) in enumerate(commands):  # the why after the command, else above it;
        label = f"{'next' if i == 0 else '':<12}"  # a command is never wrapped: it is copied
        if aligned or not why:
            lines.append(label + (f"{command:<{width}}  # {why}" if why else command))
        else:
            lines += [f"{label}# {why}", " " * 12 + command]
    text = "\n".join(lines)
    print(text, flush=True)
    return text

"""Plumbing shared by the numbered scripts: CLI, seeding, devices, several processes (torchrun),
checkpoints, dataset readers and samplers, toy data, grids, logging, metric backbones. Nothing a
paper names lives here (networks, losses, EMA, truncation, R1 ... stay in the scripts). The toy
data generator and its oracle: data/toy.py."""
import argparse
import ast
import contextlib
import dataclasses
import datetime
import inspect
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import textwrap
import threading
import time
import typing
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from data.toy import (FACE_ATTRS, SHAPES, make_toy, read_faces,  # noqa: F401 (re-exported)
                      read_scenes, read_shapes)

ROOT = Path(__file__).resolve().parent


# ---- Errors: bad input is one line that names the file or flag and the fix, never a deep traceback
class UserError(Exception):
    pass


class SharedError(UserError):
    """Raised by every process at the same point (an agreed stop, synced losses, rank 0's answer):
    under torchrun rank 0 alone prints it."""


def require(cond, msg):
    if not cond:
        raise UserError(msg)


def main_guard(fn, argv=None):
    if argv is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _ctrl_c_once)  # the command line (tests pass argv)
    rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1)))
    try:
        fn(argv)
    except UserError as e:
        # Under torchrun: an error every process raised alike (command line, agreed, synced) is
        # printed once, by rank 0; any other by each process that met it, naming its rank.
        alike = isinstance(e, SharedError) or not dist.is_initialized()
        if rank == 0 or not alike:
            print(f"error: {'' if alike or world == 1 else f'rank {rank}: '}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a training loop (which saves first): nothing to keep
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except dist.DistError as e:  # a peer died or hung (TIMEOUT): its own message is above
        print(f"error: rank {rank}: lost contact with another process ({_first_line(e)})",
              file=sys.stderr)
        sys.exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()


def _ctrl_c_once(signum, frame):
    """The first Ctrl-C stops the command (a training loop saves first); more presses are ignored,
    so they cut neither the checkpoint write nor the exit short (Ctrl-\\ still kills)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


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
    values, ns.given = {**presets.get(ns.preset, {}), **given}, tuple(given)  # given: see resume
    # Default loader workers: at most one per usable CPU (more only compete, and torch warns)
    workers = next((f.default for f in fields if f.name == "num_workers"), None)
    if workers is not None and "num_workers" not in given:
        values["num_workers"] = min(values.get("num_workers", workers), usable_cpus())
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}), ns


def check_flags(cfg, positive="", nonneg="", unit=""):
    """Values that torch would reject deep inside (or divide by): one line naming the flag and
    its range. Each argument is a space-separated list of field names; tuples: every item."""
    rules = ((positive, lambda v: v > 0, lambda v: "≥ 1" if isinstance(v, int) else "> 0"),
             (nonneg, lambda v: v >= 0, lambda v: "≥ 0"), (unit, lambda v: 0 <= v < 1,
                                                          lambda v: "in [0, 1)"))
    for names, ok, text in rules:
        for name in names.split():
            value = getattr(cfg, name)
            items = value if isinstance(value, tuple) else (value,)
            shown, each = " ".join(map(str, items)), "each " if isinstance(value, tuple) else ""
            require(all(math.isfinite(v) and ok(v) for v in items),
                    f"--{name.replace('_', '-')} {shown}: {each}must be {text(items[0])}")


# ---- Seeding, device, precision
def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(re.fullmatch(r"cpu|cuda(:\d+)?", name),
            f"--device {name}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    n = torch.cuda.device_count() if device.type == "cuda" else 1
    require(n > (device.index or 0), f"--device {name}: " + (
        f"only {n} CUDA GPU(s) visible; use cuda:0..{n - 1}" if n else
        "no CUDA GPU is visible; use --device cpu (or auto)"))
    return device


def usable_cpus():
    """The CPUs this process may run on (taskset, a container's or a job's cpuset), not the
    machine's: the default of --num-workers is capped at it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def rng_untouched(device="cpu"):
    """Draw freely inside (sample grids, the toy oracle): torch's CPU generator, this process's
    GPU generator and Python's random are put back on leaving, so sampling never changes what a
    run trains on (the same weights with --sample-every 1 as with 100000)."""
    device = torch.device(device)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=gpus):
            yield
    finally:
        random.setstate(state)


def autocast(device, amp):
    """bf16 mixed precision. amp None (the default): on CUDA only, the CPU runs the faithful fp32
    path; True (--amp): on the CPU too, through the same autocast machinery; False: fp32."""
    kind = torch.device(device).type
    on = (kind == "cuda") if amp is None else amp and kind in ("cuda", "cpu")
    return torch.autocast(kind, dtype=torch.bfloat16) if on else contextlib.nullcontext()


# ---- Several processes: torchrun starts one per GPU (or several on the CPU); one run, not N.
# In a plain run (no torchrun, or one process) every helper below does nothing: world size 1.
TIMEOUT = datetime.timedelta(minutes=10)  # a dead or stuck peer stops the others, never a hang;
# rank 0's longest lone work (sample grids, the toy oracle, a checkpoint write) is far shorter
_PEERS = {}  # set once by init_distributed: the CPU control group and pending Ctrl-C presses


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def init_distributed(device="auto"):
    """-> this process's device. Under torchrun (WORLD_SIZE > 1): joins the process group, NCCL
    on cuda:LOCAL_RANK or gloo on the CPU (--device cpu, or no GPU). Otherwise pick_device."""
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
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                device_id=device if cuda else None)
        # The per-step stop flags (next_batch) travel between CPUs: on NCCL they would make every
        # step wait for its GPU work to finish.
        _PEERS.update(control=dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else None,
                      ctrl_c=[])
        # Ctrl-C (torchrun passes it to every process) is only recorded here: all processes
        # stop at the same step (next_batch), so rank 0 saves a state no process has moved past.
        signal.signal(signal.SIGINT, lambda *_: _PEERS["ctrl_c"].append(1))
        if dist.get_rank() > 0:  # one console: rank 0 prints (errors: see main_guard)
            sys.stdout = open(os.devnull, "w")
    return device


def _agree(problem=""):
    """Every process says whether it met a problem (a message) and whether it got Ctrl-C; then
    all raise the lowest such rank's problem as a SharedError, or KeyboardInterrupt, together."""
    if world_size() == 1:
        return
    group, ctrl_c = _PEERS.get("control"), _PEERS.setdefault("ctrl_c", [])
    flags = torch.tensor([bool(problem), bool(ctrl_c)], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    if flags[0]:
        said = [None] * world_size()
        dist.all_gather_object(said, problem, group=group)
        first = next(r for r, p in enumerate(said) if p)
        raise SharedError(f"rank {first}: {said[first]}")
    if flags[1]:
        ctrl_c.clear()
        raise KeyboardInterrupt


def next_batch(stream):
    """next(stream). Under torchrun every process also learns whether another could not read its
    share (a UserError) or got Ctrl-C, and all stop at this step: one message, or the training
    loop's KeyboardInterrupt save. One small CPU collective per step."""
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
    process holds the same RNG state (same seed, same draws in the same order), so each draws the
    whole global batch's numbers and keeps its rows: N processes × n get exactly the numbers one
    process × N·n gets. One process: draw(n), the numbers a plain run always drew."""
    world, r = world_size(), rank()
    out = draw(n * world)
    if world == 1:
        return out
    take = lambda t: t.narrow(dim, r * n, n)  # noqa: E731
    return [take(t) for t in out] if isinstance(out, (list, tuple)) else take(out)


def gather_batch(x):
    """x (n, ...) of every process, in rank order -> the global batch's (N·n, ...)."""
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
    """Under torchrun, before optimizer.step(): the gradients of the parameters these optimizers
    step, averaged over all processes in one flattened all-reduce, so each process steps with the
    gradient of the whole global batch. Chosen over DistributedDataParallel, whose reducer expects
    each wrapped parameter to get a gradient in each backward: these GAN steps use several
    optimizers, restrict a backward to some nets (02's inputs=...), call a net several times per
    step, take double backwards (R1, WGAN-GP) and call nets functionally (03's frozen_call); DDP
    copes only partly (find_unused_parameters) and obscurely. The cost: communication does not
    overlap the backward pass. A parameter without a gradient (so on every process: the same code
    runs everywhere) stays without one, so its optimizer skips it, as in a plain run."""
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
    """One run, not N: checked once at the start, every process holds rank 0's weights (they all
    built them from the same seed, or read the same checkpoint)."""
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
    """-> (cfg, checkpoint to resume or None). All checks come before the folder changes: a run
    in cfg.out is continued (--resume auto, or its own last.pt by path) or, with --overwrite,
    moved aside; never replaced. given / fixed: see resume_config. Under torchrun rank 0 alone
    looks at and changes the folder; every process gets its answer (or its error)."""
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
    out.mkdir(parents=True, exist_ok=True)
    Path(f"{last}.tmp").unlink(missing_ok=True)  # left by a process killed while saving
    return cfg, ckpt


def _move_aside(out, ckpt):
    """--overwrite: out -> out.old-N (first free N), so the new run starts in a clean folder
    (no old log lines, samples or figures) and nothing is deleted. -> where ckpt is now."""
    here = Path.cwd().resolve()
    require(not here.is_relative_to(out.resolve()), f"--out {out}: --overwrite would move the "
            "folder you are working in; pass a run folder such as runs/<name>")
    n = 1
    while (aside := out.with_name(f"{out.name}.old-{n}")).exists():
        n += 1
    inside = ckpt is not None and ckpt.resolve().is_relative_to(out.resolve())
    moved = aside / ckpt.resolve().relative_to(out.resolve()) if inside else ckpt
    out.rename(aside)
    print(f"--overwrite: moved the previous run {out} to {aside} (delete it once not needed)")
    return moved


def resume_config(cfg, path, given=(), fixed=()):
    """The config a resumed run trains with. Flags left out keep the checkpoint's values; a given
    flag that changes one is applied and printed, or refused if in `fixed` (architecture and
    data: the weights would not fit, or would mean something else). A moved copy of the data
    (same folder name) is applied. LOCAL settings always come from this invocation."""
    state, values = read_checkpoint(path, type(cfg)), {}
    saved, world = state["config"], world_size()
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
                f"resumed run keeps its architecture and data: leave --{flag} out, or start a new "
                "run (another --out)")
        print(f"resume: {k} {old} -> {new} (applied)")
    cfg, was = dataclasses.replace(cfg, **values), state.get("world", 1)  # processes that wrote it
    if was != world and "batch" in saved:  # --batch is per process
        print(f"resume: {path} was trained by {was} process(es) × batch {saved['batch']} (global "
              f"batch {was * saved['batch']}); now {world} × {cfg.batch} = {world * cfg.batch}")
    return cfg


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
def _sigint_held(deliver=True):
    """Ctrl-C inside is recorded instead of raised, so a write is never cut short; on leaving,
    it is delivered once (deliver) or dropped. Only the main thread may set signal handlers."""
    before = signal.getsignal(signal.SIGINT)
    if before in (None, signal.SIG_IGN) or threading.current_thread() != threading.main_thread():
        yield
        return
    hits = []
    signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if hits and deliver:
        signal.raise_signal(signal.SIGINT)


def save_checkpoint(path, step, cfg, nets, opts, extra=None, losses=None, interrupted=False):
    """Never replaces the last good checkpoint with a broken one: finite losses and tensors only,
    atomic (temp file + os.replace), Ctrl-C held until the file is complete (then delivered;
    interrupted=True: this save answers a Ctrl-C, so further ones are dropped)."""
    with _sigint_held(deliver=not interrupted):
        # Every process checks (the losses synced, the weights the same everywhere), so all stop
        # together; rank 0 alone writes.
        check_finite(mean_over_ranks(losses or {}), step, path)
        cuda = [] if not torch.cuda.is_available() else torch.cuda.get_rng_state_all() \
            if world_size() == 1 else [torch.cuda.get_rng_state()] \
            if torch.cuda.is_initialized() else []  # torchrun: its own GPU, if it trains on one
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
            raise SharedError(f"step {step}: {bad} is not finite; stopping without saving. Last "
                              f"good checkpoint: {_last_good(path)} (try a lower lr, or --no-amp)")
        if not is_main():
            return
        tmp = Path(f"{path}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def load_checkpoint(path, nets, opts=None, map_location="cpu", restore_rng=True):
    """Nets, optimizer state and RNG from `path`. The optimizers keep this run's lr, betas, eps
    and weight decay (applied on resume, see resume_config); moments and step counts are loaded.
    Under torchrun every process reads the file; if one cannot, all stop with its message."""
    if world_size() == 1:
        return _load_checkpoint(path, nets, opts, map_location, restore_rng)
    try:
        state, problem = _load_checkpoint(path, nets, opts, map_location, restore_rng), ""
    except UserError as e:
        state, problem = None, f"{e} (several machines: put --out on a shared filesystem)"
    _agree(problem)
    return state


def _load_checkpoint(path, nets, opts, map_location, restore_rng):
    state = read_checkpoint(path, map_location=map_location)
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
        version, internal, gauss = state["rng"]["python"]  # setstate wants tuples, not lists
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["rng"]["torch"])
        cuda = state["rng"]["cuda"]
        if cuda and torch.cuda.is_available() and world_size() == 1:
            torch.cuda.set_rng_state_all(cuda)
        elif cuda and torch.cuda.is_available():  # every process: the state of the first GPU
            torch.cuda.set_rng_state(cuda[0])  # (rank 0's, or a plain run's cuda:0)
    return state


def _last_good(path):
    return path if path and Path(path).exists() else "none yet"


def check_finite(losses, step, last_ckpt=None):
    """Stop at a nan/inf loss term: called at every log step (the losses are synced there) and
    before every save, so a run never trains on, or saves, a broken state."""
    for k, v in losses.items():
        if not math.isfinite(float(v)):  # shared: under torchrun the losses are synced first
            raise SharedError(f"step {step}: loss term '{k}' is {float(v)}; stopping without "
                              f"saving. Last good checkpoint: {_last_good(last_ckpt)} (try a lower "
                              "lr, or --no-amp)")


def check_save(path, step, cfg, nets, opts, extra=None):
    """Before the first step: a whole checkpoint is written beside `path` (as the loop will write
    it), read back (as a resume will) and removed, so an unwritable --out, a full disk or a state
    that cannot be reloaded shows now, not at the first save. Costs one save and one load."""
    probe, problem = Path(f"{path}.tmp"), ""  # the name prepare_run clears if we are killed
    try:
        save_checkpoint(probe, step, cfg, nets, opts, extra)
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
    """due(step): write last.pt now? Every `every` steps, at the last step, and when `minutes` of
    wall time (0: never) have passed since the last save or the start, so a crash or a kill never
    costs more than that. Under torchrun saving is collective, so every process must answer
    alike: rank 0's clock decides, told to the others at the log steps (one small broadcast on
    the CPU group, where the losses are synced anyway)."""
    clock = staticmethod(time.monotonic)  # tests patch it

    def __init__(self, every, minutes, total, log_every):
        self.every, self.seconds, self.total, self.log_every = every, minutes * 60, total, log_every
        self.t0 = self.clock()

    def due(self, step):
        now = self.clock()
        late = self.seconds > 0 and now - self.t0 >= self.seconds
        if world_size() > 1:
            if step % self.log_every:
                late = False
            else:
                flag = torch.tensor([int(late)])
                dist.broadcast(flag, 0, group=_PEERS.get("control"))
                late = bool(flag)
        if late or step % self.every == 0 or step == self.total:
            self.t0 = now
            return True
        return False


def report_crash(e, step, last):
    """In a training loop's `except Exception`: an unexpected error (a bug, not bad input, a nan
    or a lost peer, which have their own one-line messages) gets one line naming where the run
    stopped and the checkpoint it left untouched; the caller re-raises: the traceback follows."""
    if isinstance(e, (UserError, dist.DistError)):
        return
    where = f"rank {rank()}: " if world_size() > 1 else ""
    age = f" (saved {duration(time.time() - Path(last).stat().st_mtime)} ago; --resume auto " \
        "goes on from it)" if Path(last).exists() else ""
    print(f"error: {where}{type(e).__name__} after step {step}; nothing was saved since. Last "
          f"good checkpoint: {_last_good(last)}{age}. Traceback, for a bug report:",
          file=sys.stderr, flush=True)


def start_line(cfg, device, step, *parts):
    """The line a training run starts with: what it trains, where, from which step, with how many
    loader workers (of the CPUs it may use) and, under torchrun, processes."""
    world = [f"{world_size()} processes × batch {cfg.batch}"] if world_size() > 1 else []
    return " | ".join([*parts, f"device {device}", f"from step {step}", f"{cfg.num_workers} "
                       f"loader workers ({usable_cpus()} CPUs)", *world])


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
            torch.manual_seed(key)
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


# ---- Output: grids, GIFs, console and JSONL logging, loss curves, the end-of-run summary
def sig3(x):
    """x with 3 significant digits and no exponent (bench lines): 0.0123, 4.56, 78.9, 2160."""
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if x else "0"


def zoom_for(side):
    """Nearest-neighbour factor that brings an image side under 64 px to at least 64 px (8 px ×8,
    16 px ×4, 32 px ×2): a viewer then shows the toy's pixels, not a blur or a stamp."""
    return max(1, -(-64 // side))


def save_grid(images, path, nrow, rows=(), cols=()):
    """images (N, 3, H, W) in [-1, 1] -> a PNG/JPEG grid, nrow per row; rows / cols: labels
    written left of each row / above each column (e.g. which styles a row takes, ψ)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().cpu()
    if (k := zoom_for(images.shape[-1])) > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=k, mode="nearest")
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1, normalize=True,
                                       value_range=(-1, 1))
    img = v2.functional.to_pil_image(grid.mul(255).add(0.5).clamp(0, 255).byte())
    if rows or cols:
        font, side = _font(12), images.shape[-1] + 1  # a cell and its padding
        left = max((int(font.getlength(t)) + 8 for t in rows), default=0)
        framed = Image.new("RGB", (img.width + left, img.height + 18 * bool(cols)), "white")
        framed.paste(img, (left, 18 * bool(cols)))
        draw = ImageDraw.Draw(framed)
        for i, text in enumerate(rows):
            draw.text((left - 4, 18 * bool(cols) + side * i + side // 2), text, "black", font, "rm")
        for j, text in enumerate(cols):
            draw.text((left + side * j + side // 2, 9), text, "black", font, "mm")
        img = framed
    img.save(path)


def save_gif(frames, path, duration_ms=100):
    """frames: list of (3, H, W) in [-1, 1] -> an animated GIF that loops forever (frames under
    64 px high are enlarged as save_grid does)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    u8 = [((f.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte() for f in frames]
    k = zoom_for(u8[0].shape[1])
    u8 = [u.repeat_interleave(k, 1).repeat_interleave(k, 2) for u in u8]
    pil = [v2.functional.to_pil_image(u).convert("P", palette=Image.Palette.ADAPTIVE) for u in u8]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)


def clock(seconds):
    """h:mm:ss with unbounded hours (a 400k-step run's ETA runs to days)."""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Logger:
    """Every `every` steps: one console line of at most 120 columns (step, it/s, ETA and the
    `show` terms: {label: key, or a function of the logged values}; default every term, while
    they fit) and every term as one JSON line in out/log.jsonl, which plot() draws. The clock
    starts here, at step `start` (where this process trains from), so the first line has a rate."""
    WIDTH = 120

    def __init__(self, out, total, every, show=None, panels=None, start=0):
        self.path, self.total, self.every, self.show = Path(out) / "log.jsonl", total, every, show
        self.panels, self.step0, self.t0 = panels, start, time.time()

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
        print(self.line(step, vals), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **vals}) + "\n")

    def plot(self, path):
        return plot_log(self.path, path, self.panels)


def read_log(path):
    """log.jsonl -> {step: {term: value}}, the last line of a step winning (a resumed run may log
    a step twice); a line cut short by a killed process is skipped; no file yet: {}."""
    rows, path = {}, Path(path)
    for text in (path.read_text() if path.exists() else "").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            row = json.loads(text)
            step = int(row.pop("step"))
            rows[step] = {k: v for k, v in row.items() if k != "time"}
    return dict(sorted(rows.items()))


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34), (127, 127, 127)]


def _font(size):
    try:
        return ImageFont.load_default(size)  # Pillow ≥ 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def plot_log(log_path, png_path, panels=None, width=720):
    """The logged curves as a PNG (Pillow only): one panel per network (panels {title: keys};
    default: the key's prefix, 'D/adv' -> D), one strip per term on its own y range (that of the
    last 90 % of the points, so a spike in the first steps does not flatten the rest), labelled
    with its range and last value; a dotted line marks 0 when it is in range. Returns png_path."""
    rows = read_log(log_path)
    steps, keys = list(rows), list(dict.fromkeys(k for r in rows.values() for k in r))
    if panels is None:
        panels = {}
        for k in keys:
            panels.setdefault(k.split("/")[0] if "/" in k else "other", []).append(k)
    panels = {t: [k for k in ks if k in keys] for t, ks in panels.items()}
    panels = {t: ks for t, ks in panels.items() if ks}
    strip, head, foot, left, right = 46, 24, 20, 230, 12
    height = 30 + sum(head + strip * len(ks) + foot for ks in panels.values())
    img = Image.new("RGB", (width, height), "white")
    draw, big, small = ImageDraw.Draw(img), _font(15), _font(12)
    x0, x1 = left, width - right
    span = f"steps {steps[0]}-{steps[-1]}, {len(steps)} points" if steps else "nothing logged yet"
    draw.text((8, 6), f"{Path(log_path).parent.name}: losses ({span})", "black", big)
    y, color = 30, iter(_COLORS * 10)
    for title, ks in panels.items():
        draw.text((8, y + 4), title, "black", big)
        y += head
        for k in ks:
            pts = [(s, r[k]) for s, r in rows.items() if k in r and math.isfinite(r[k])]
            c = next(color)
            _strip(draw, pts, k, c, (x0, y + 4, x1, y + strip - 6), steps, small)
            y += strip
        for frac, anchor in ((0, "la"), (0.5, "ma"), (1, "ra")):  # the step axis of this panel
            if steps:
                s = steps[0] + frac * (steps[-1] - steps[0])
                draw.text((x0 + frac * (x1 - x0), y - 4), f"{s:.0f}", (90, 90, 90), small, anchor)
        y += foot
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    img.save(png_path)
    return png_path


def _strip(draw, pts, name, color, box, steps, font):
    """One term: name and last value at the left, its range beside the box, the curve inside
    (wider than the box: per pixel column, the min-max span in a light tint and the mean)."""
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
    px = lambda s: bx0 + (s - s0) / (s1 - s0) * (bx1 - bx0)  # noqa: E731
    py = lambda v: by1 - (min(max(v, lo), hi) - lo) / (hi - lo) * (by1 - by0)  # noqa: E731
    if lo < 0 < hi:
        for x in range(bx0, bx1, 6):
            draw.line([(x, py(0)), (x + 2, py(0))], (150, 150, 150))
    cols = {}
    for s, v in pts:
        cols.setdefault(round(px(s)), []).append(v)
    tint = tuple(int(c + (255 - c) * 0.65) for c in color)
    for x, vs in cols.items():
        if len(vs) > 1:
            draw.line([(x, py(min(vs))), (x, py(max(vs)))], tint)
    line = [(x, py(sum(vs) / len(vs))) for x, vs in sorted(cols.items())]
    draw.line(line, color, 2) if len(line) > 1 else draw.ellipse(
        [line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], color)


def short_path(path):
    """path relative to the working directory when it lies below it (commands to copy)."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def duration(seconds):
    """42 s, 9 min 41 s, 3 h 05 min."""
    s = round(seconds)
    return (f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else
            f"{s // 3600} h {s // 60 % 60:02d} min")


def print_summary(script, step, start, seconds, files, oracle=(), commands=(), stopped=False,
                  after=(0, "")):
    """The last lines of every training run, one form for all scripts: steps and wall time, the
    outputs ([(label, [paths])]; a path in the folder of the one before it is shown by its name;
    missing ones are left out), the toy oracle's lines, the next commands [(command, why)].
    after = (seconds, what): time spent after the last step (figures, the oracle). -> the text"""
    done = "stopped by Ctrl-C at" if stopped else "done:"
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


# ---- StarGAN v2's face-alignment network (FAN): the face masks of its CelebA-HQ generator
def _bn_relu_conv(c_in, c_out, k):
    return [nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=False)]


class _FanBlock(nn.Module):
    """Hierarchical residual block: three BN-ReLU-3×3 convs to C/2, C/4, C/4 channels, their
    outputs concatenated to C, plus the input (through BN-ReLU-1×1 when the width changes)."""
    def __init__(self, c_in, c_out):
        super().__init__()
        widths = (c_in, c_out // 2, c_out // 4, c_out // 4)
        for i in range(3):  # official names: bn1 conv1 bn2 conv2 bn3 conv3
            bn, _, conv = _bn_relu_conv(widths[i], widths[i + 1], 3)
            self.add_module(f"bn{i + 1}", bn)
            self.add_module(f"conv{i + 1}", conv)
        self.downsample = nn.Sequential(*_bn_relu_conv(c_in, c_out, 1)) if c_in != c_out else None

    def forward(self, x):
        h, outs = x, []
        for i in (1, 2, 3):
            h = getattr(self, f"conv{i}")(torch.relu(getattr(self, f"bn{i}")(h)))
            outs.append(h)
        return torch.cat(outs, 1) + (x if self.downsample is None else self.downsample(x))


class _CoordConv(nn.Module):
    """Conv on [x, i, j, r]: the row and column coordinates in [-1, 1] and the radius / its max,
    so the landmark heads know where in the image a feature is (CoordConv, Liu et al. 2018)."""
    def __init__(self, c_in, c_out, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 3, c_out, k, stride, k // 2)

    def forward(self, x):
        B, _, H, W = x.shape
        i = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)[:, None].expand(H, W)
        j = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)[None, :].expand(H, W)
        r = (i.square() + j.square()).sqrt()
        coords = torch.stack([i, j, r / r.max()]).expand(B, 3, H, W)  # (B, 3, H, W)
        return self.conv(torch.cat([x, coords], 1))


class FAN(nn.Module):
    """The official face-alignment network of StarGAN v2 (AdaptiveWing FAN, one 4-level
    hourglass): x (B, 3, 256, 256) in [0, 1] -> 98 landmark heatmaps + 1 boundary map at 64×64.
    Frozen: BatchNorm always uses its running statistics (train() keeps it in eval mode)."""
    def __init__(self, depth=4, width=256, n_landmarks=98):
        super().__init__()
        self.depth = depth
        self.conv1 = _CoordConv(3, 64, 7, 2)  # 128×128
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2, self.conv3, self.conv4 = _FanBlock(64, 128), _FanBlock(128, 128), \
            _FanBlock(128, width)
        self.m0 = nn.Module()  # the hourglass, named as in wing.ckpt
        self.m0.coordconv = _CoordConv(width, width, 1, 1)
        for level in range(depth, 0, -1):  # registration order = the official key order
            self.m0.add_module(f"b1_{level}", _FanBlock(width, width))
            self.m0.add_module(f"b2_{level}", _FanBlock(width, width))
        self.m0.b2_plus_1 = _FanBlock(width, width)
        for level in range(1, depth + 1):
            self.m0.add_module(f"b3_{level}", _FanBlock(width, width))
        self.top_m_0 = _FanBlock(width, width)
        self.conv_last0 = nn.Conv2d(width, width, 1)
        self.bn_end0 = nn.BatchNorm2d(width)
        self.l0 = nn.Conv2d(width, n_landmarks + 1, 1)
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    def _hourglass(self, x, level):
        """up = b1(x); low = b3(inner(b2(pool(x)))); up + nearest ×2 upsampling of low."""
        m = self.m0
        low = getattr(m, f"b2_{level}")(nn.functional.avg_pool2d(x, 2))  # H/2
        low = self._hourglass(low, level - 1) if level > 1 else m.b2_plus_1(low)
        low = getattr(m, f"b3_{level}")(low)
        return getattr(m, f"b1_{level}")(x) + nn.functional.interpolate(low, scale_factor=2.0)

    def forward(self, x):
        """x (B, 3, 256, 256) in [0, 1] -> heatmaps (B, 99, 64, 64)."""
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, 64, 128, 128)
        x = nn.functional.avg_pool2d(self.conv2(x), 2)  # (B, 128, 64, 64)
        x = self.conv4(self.conv3(x))  # (B, 256, 64, 64)
        x = self.top_m_0(self._hourglass(self.m0.coordconv(x), self.depth))
        return self.l0(torch.relu(self.bn_end0(self.conv_last0(x))))  # (B, 99, 64, 64)

    @torch.no_grad()
    def heatmaps(self, x):
        """x (B, 3, H, W) in [-1, 1] -> the 98 landmark heatmaps (B, 98, 256, 256), float32."""
        with torch.autocast(x.device.type, enabled=False):  # the mask powers need fp32
            x = nn.functional.interpolate(x.float(), size=256, mode="bilinear")
            heat = self(x * 0.5 + 0.5)[:, :-1]  # (B, 98, 64, 64): the boundary map is unused
            return nn.functional.interpolate(heat, size=256, mode="bilinear", align_corners=True)

    def masks(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (whole face, eyes + nose), each (B, 1, 256, 256)."""
        return face_masks(self.heatmaps(x))

    @torch.no_grad()
    def landmarks(self, x):
        """x (B, 3, H, W) in [-1, 1] -> 98 landmarks (B, 98, 2) as (x, y) pixels of x."""
        with torch.autocast(x.device.type, enabled=False):
            heat = self(nn.functional.interpolate(x.float(), size=256, mode="bilinear") * 0.5
                        + 0.5)[:, :-1]  # (B, 98, 64, 64)
        return heat_peaks(heat) * (x.shape[2] / heat.shape[2])  # official: // (same at 256)


# Landmark index ranges of the 98-point (WFLW) layout, end excluded, and what face_masks does with
# each: (rows to move the map up, negative = down; power that sharpens it). Official values.
_MASK_PARTS = {"chin": (8, 25, 0, 3), "eyebrows": (33, 51, -7, 2), "nostrils": (55, 60, 8, 4),
               "lip_upper": (77, 82, -8, 4), "lip_lower": (83, 88, 8, 4),
               "lip_inner": (88, 96, -2, 3)}


def face_masks(heat):
    """The official heatmap-to-mask recipe: heat (B, 98, H, W), H = 256 -> two (B, 1, H, W) masks
    in [0, 1]: [0] every kept part (used at 32 px), [1] without jaw line, mouth and eyebrows."""
    up = lambda h, rows: torch.roll(h, -rows, dims=2)  # noqa: E731 (content moves up, wraps)
    sw = heat.shape[2] // 256  # the shifts are in pixels of a 256-px image
    x = torch.where(heat < 0.1, torch.zeros_like(heat), heat)  # drop the faint tails
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    x = (x - lo) / (hi - lo + 1e-6)  # each map min-max normalised to [0, 1]
    for a, b, rows, power in _MASK_PARTS.values():
        x[:, a:b] = up(x[:, a:b], rows * sw) ** power
    x[:, list(range(0, 8)) + list(range(25, 33)) + [33, 46, 76, 82]] = 0  # outer jaw, corners
    x[:, 52:55] = up(x[:, 52:55], 4 * sw)  # nose ridge (52-54; 51, its top, stays)
    x[:, 60:76] = up(x[:, 60:76], -8) ** 3 + up(x[:, 60:76], -24)  # eyes (official: not × sw)
    x2 = x.clone()
    x2[:, 8:25] = x2[:, 33:51] = x2[:, 76:96] = 0  # second level: no jaw line, eyebrows, mouth
    return tuple(m.sum(1, keepdim=True).nan_to_num(0).clamp(0, 1) for m in (x, x2))


def load_fan(path, device="cpu"):
    """wing.ckpt ({'state_dict': ...}) -> a frozen FAN in eval mode; entries matched by name, extra
    entries ignored (as official), a missing or mis-shaped one refused with one line."""
    fix = "get it with `python data/download.py wing` (or pass --wing PATH)"
    require(Path(path).is_file(), f"{path}: no FAN weights (wing.ckpt) here; {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holding pickled Python objects
        raise UserError(f"{path}: cannot read it as a torch checkpoint ({type(e).__name__}); "
                        f"delete it and {fix}") from None
    state = strip_prefixes(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {})
    fan = FAN()
    for key, want in fan.state_dict().items():
        got = state.get(key)
        require(got is not None, f"{path}: no entry '{key}'; not the StarGAN v2 wing.ckpt? {fix}")
        require(got.shape == want.shape, f"{path}: '{key}' is {tuple(got.shape)}, expected "
                f"{tuple(want.shape)}; not the StarGAN v2 wing.ckpt? {fix}")
    fan.load_state_dict({k: state[k] for k in fan.state_dict()})
    return fan.to(device)


def heat_peaks(heat):
    """Official read-out: argmax of each map, a quarter pixel toward the higher neighbour (away
    from the border), centred: heat (B, L, h, w) -> (B, L, 2) as (x, y) in heatmap pixels."""
    B, L, h, w = heat.shape
    idx = heat.flatten(2).argmax(2)  # (B, L)
    row, col = idx // w, idx % w
    inner = (row > 0) & (row < h - 1) & (col > 0) & (col < w - 1)
    r0, r1, c0, c1 = ((v + d).clamp(0, n - 1) for v, d, n in
                      ((row, -1, h), (row, 1, h), (col, -1, w), (col, 1, w)))
    at = lambda r, c: heat.flatten(2).gather(2, (r * w + c)[..., None])[..., 0]  # noqa: E731
    dx, dy = (at(row, c1) - at(row, c0)).sign(), (at(r1, col) - at(r0, col)).sign()
    xy = torch.stack([col + 0.25 * dx * inner, row + 0.25 * dy * inner], -1)  # (B, L, 2)
    return xy.float() + 0.5  # the official 1-based index minus 0.5


# ---- Face alignment onto the mean CelebA-HQ landmarks (the official `align` mode)
def read_npz(path, key=None):
    """A NumPy .npz (a zip of .npy files) or .npy, read without NumPy: {name: tensor} or the
    tensor `key`. Little-endian float32 / float64 in C order only; anything else is refused."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                arrays = {n.removesuffix(".npy"): _read_npy(z.read(n), f"{path}:{n}")
                          for n in z.namelist()}
        else:
            arrays = {"": _read_npy(Path(path).read_bytes(), path)}
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}); get it with "
                        "`python data/download.py wing`") from None
    if key is None:
        return arrays
    require(key in arrays, f"{path}: no array '{key}' (has {sorted(arrays)})")
    return arrays[key]


def _read_npy(raw, name):
    """.npy: magic, version, header length, a dict literal header, then the raw values."""
    require(raw[:6] == b"\x93NUMPY", f"{name}: not a .npy array (bad magic bytes)")
    n = 4 if raw[6] >= 2 else 2  # header-length field: 2 bytes (v1), 4 bytes (v2, v3)
    size = int.from_bytes(raw[8:8 + n], "little")
    try:
        header = ast.literal_eval(raw[8 + n:8 + n + size].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise UserError(f"{name}: unreadable .npy header") from None
    dtypes = {"<f4": torch.float32, "<f8": torch.float64}
    require(descr in dtypes, f"{name}: dtype {descr!r}; only little-endian float32 ('<f4') and "
            "float64 ('<f8') are read")
    require(not fortran, f"{name}: Fortran-ordered array; re-save it in C order "
            "(numpy.ascontiguousarray)")
    data = bytearray(raw[8 + n + size:])
    count = math.prod(shape)
    require(len(data) >= count * dtypes[descr].itemsize, f"{name}: truncated array data")
    return torch.frombuffer(data, dtype=dtypes[descr], count=count).reshape(shape).clone()


def similarity_to(lm, ref):
    """The official landmark alignment (3, 3): move lm's mean to the origin, rotate its face x-axis
    onto ref's, scale by the mean distance ratio of eyes + mouth ends, move to ref's mean."""
    def xaxis(p):  # eye-to-eye minus the 90°-rotated eye-centre-to-mouth-centre vector
        eye_l, eye_r = p[[*range(60, 68), 96]].mean(0), p[[*range(68, 76), 97]].mean(0)
        up = (eye_l + eye_r) / 2 - (p[76] + p[82]) / 2
        v = eye_r - eye_l - torch.stack([up[1], -up[0]])
        return v / v.norm()

    def shift(t):
        m = torch.eye(3, dtype=torch.float64)
        m[:2, 2] = t
        return m

    lm, ref = lm.double(), ref.double()
    a, b = xaxis(lm), xaxis(ref)
    cos, sin = a @ b, a[0] * b[1] - a[1] * b[0]  # the angle from lm's axis to ref's
    rot = torch.tensor([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], dtype=torch.float64)
    keys = [96, 97, 76, 82]  # eye centres, mouth ends
    scale = ((ref - ref.mean(0)).norm(dim=1) / (lm - lm.mean(0)).norm(dim=1))[keys].mean()
    return shift(ref.mean(0)) @ torch.diag(torch.stack([scale, scale, scale.new_ones(())])) \
        @ rot @ shift(-lm.mean(0))


def mirror_pad(img, lm):
    """img (3, H, W) in [0, 1]: reflect-pad by half the size, fade the padding into a blurred copy
    (fewer mirrored features at the edges of an aligned face), as official; lm moves with it."""
    H, W = img.shape[1:]
    img = nn.functional.pad(img[None], (W // 2, W // 2, H // 2, H // 2), mode="reflect")[0]
    Hp, Wp = img.shape[1:]
    sigma = H // 100
    blurred = nn.functional.interpolate(img[None], size=(H, W), mode="bilinear")
    if sigma > 0:  # kernel truncated at 4 sigma as scikit-image's; edges reflect, not repeat
        blurred = v2.functional.gaussian_blur(blurred, [2 * 4 * sigma + 1] * 2, [float(sigma)] * 2)
    blurred = nn.functional.interpolate(blurred, size=(Hp, Wp), mode="bilinear")[0]
    ramp = lambda n: torch.minimum(torch.arange(n), torch.arange(n).flip(0)) / (Hp // 4)  # noqa
    weight = torch.minimum(ramp(Hp)[:, None], ramp(Wp)[None]).clamp(max=1) ** 4  # (Hp, Wp)
    return img * weight + blurred * (1 - weight), lm + torch.tensor([Wp // 4, Hp // 4])


def warp(img, matrix, size):
    """out(p) = img(matrix⁻¹ p) on a size×size grid, bicubic (official: Lanczos), pixel centres
    at integers; img (3, H, W) -> (3, size, size)."""
    def to_norm(w, h):  # pixel centre p -> grid_sample's (2p + 1) / n - 1 (align_corners False)
        return torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]],
                            dtype=torch.float64)

    H, W = img.shape[1:]
    theta = to_norm(W, H) @ torch.linalg.inv(matrix) @ torch.linalg.inv(to_norm(size, size))
    grid = nn.functional.affine_grid(theta[None, :2].float(), [1, 3, size, size],
                                     align_corners=False)
    return nn.functional.grid_sample(img[None], grid, mode="bicubic", align_corners=False)[0]


def align_face(x, lm, ref):
    """x (3, H, W) in [-1, 1], its landmarks lm (98, 2) -> (3, S, S) aligned onto ref, S = H."""
    img, lm = mirror_pad((x + 1) / 2, lm)
    return (warp(img, similarity_to(lm, ref), x.shape[1]) * 2 - 1).clamp(-1, 1)


def align_faces(fan, x, ref):
    """x (B, 3, S, S) in [-1, 1] -> each face aligned onto the reference landmarks ref (98, 2)."""
    lms = fan.landmarks(x).cpu()  # (B, 98, 2)
    return torch.stack([align_face(img, lm, ref) for img, lm in zip(x.cpu().float(), lms)])

"""Shared test helpers. The numbered scripts start with digits, so they are loaded by path."""
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# The official networks' state_dict layouts (key and shape per entry), kept with the tests
# so that every clone checks them.
LAYOUTS = Path(__file__).resolve().parent / "layouts"
sys.path.insert(0, str(ROOT))  # so `import common` works from any working directory
import common  # noqa: E402

_cache = {}


def load_script(name):
    """Import e.g. '02_stargan_v2' from the repo root once and return the module."""
    if name not in _cache:
        spec = importlib.util.spec_from_file_location(name.replace("0", "s", 1), ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _cache[name] = module
    return _cache[name]


# Pinned, so common.fit_threads leaves the count alone: trajectories compared within a test (resume,
# sample steps) must not depend on what else the machine runs. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores: keep torch from oversubscribing them, and keep every test deterministic.
    # OMP_NUM_THREADS=1 is honoured: on a shared machine 2 threads each run ~50x slower.
    torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS") or 2)))
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _stop_handlers():
    # main_guard(fn) with no argv (the command line) installs stop-signal handlers and records the
    # command: undone after each test, so later ones start as a fresh process does. A suite
    # started in the background (`&`, nohup) inherits an ignored SIGINT; the tests model a
    # terminal's Ctrl-C, so they start from Python's own handler.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    before = {sig: signal.getsignal(sig) for sig in common.STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)
    common._STOP.update(by=0, pending=[], command=None)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def write_unreadable(path, kind):
    """The damaged files users have: random bytes, an empty file, text named like an image, and a
    PNG whose IDAT length is wrong (PIL raises SyntaxError, not OSError, for that one)."""
    if kind == "chunk":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
        data = bytearray(buf.getvalue())
        data[data.find(b"IDAT") - 1] = 4  # the chunk length: the reader lands inside the data
    else:
        data = {"random": random.Random(str(path)).randbytes(300), "empty": b"",
                "text": b"this is a text file, not an image\n"}[kind]
    path.write_bytes(bytes(data))
    return path


def summary_files(text):
    """The files a run's end-of-run summary (common.print_summary) names: the rows between its
    '== ' header and the 'oracle' / 'next' rows; a name without '/' lies in the folder of the path
    before it. Paths are taken relative to the working directory, as printed."""
    start = text.rindex("\n== ") + 1 if "\n== " in text else text.index("== ")
    block = text[start:].splitlines()[1:]
    files, folder, label = {}, None, ""
    for line in block:
        label = line[:12].strip() or label
        if label in ("oracle", "next"):
            break
        for token in line[12:].split():
            path = Path(token) if "/" in token else folder / token
            files.setdefault(label, []).append(path)
            folder = path.parent
    return files


def console_lines(text):
    """The training-progress lines a run printed (common.Logger)."""
    return [ln for ln in text.splitlines() if ln.startswith("step ") and " it/s | ETA " in ln]


def widest_console_line(show, keys, total):
    """A script's console line at its widest: every logged term -0.0123 (7 characters with 3
    significant digits), half of `total` steps done at 0.0123 it/s (an ETA of thousands of hours).
    Asserts that it fits 120 columns with every chosen term; returns it."""
    logger = common.Logger(ROOT, total, 1, show)
    logger.t0 -= total // 2 / 0.0123
    line = logger.line(total // 2, dict.fromkeys(keys, -0.0123))
    assert len(line) <= 120 and all(f" {label} -0." in line for label in show), line
    return line


def stop_with_signal(argv, sig, nproc=0, group=False, timeout=120):
    """A training command started as on a cluster (`python SCRIPT ...`, or torchrun with nproc
    processes), sent `sig` once its first progress line is out -> (exit status, stdout, stderr).
    group: to every process it started too (data loader workers), as SLURM signals a job step.
    SIGINT is reset to its default first: a background process would ignore it."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    p = subprocess.Popen([sys.executable, *(launch if nproc else []), *map(str, argv)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                         start_new_session=True)  # its own process group
    seen = []
    for line in p.stdout:  # ends early if the process dies before its first step
        seen.append(line)
        if console_lines(line):
            break
    os.killpg(p.pid, sig) if group else p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, "".join(seen) + out, err


def build_all(script, cfg, *args):
    """A script's nets, then its optimizers, as one tuple: build_nets(cfg, *args) in its order
    (01: G, D; 04: G, D, G_ema), then build_optims (G, D)."""
    nets = script.build_nets(cfg, *args)
    return (*vars(nets).values(), *script.build_optims(nets, cfg).values())

"""Shared test helpers. The numbered scripts start with digits, so they are loaded by path."""
import importlib.util
import io
import random
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so `import common` works from any working directory
_cache = {}


def load_script(name):
    """Import e.g. '02_stargan_v2' from the repo root once and return the module."""
    if name not in _cache:
        spec = importlib.util.spec_from_file_location(name.replace("0", "s", 1), ROOT / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _cache[name] = module
    return _cache[name]


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores: keep torch from oversubscribing them, and keep every test deterministic.
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


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

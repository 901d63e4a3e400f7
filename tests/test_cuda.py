"""The GPU check: `python -m pytest -m cuda -q` on a machine with a CUDA GPU (deselected by default,
skipped without CUDA). Every script at its real size (01 at 128 px, 02/03/04 at 256 px, the papers'
widths) trains 3 iterations on small synthetic data with bf16 autocast on and off, saves, resumes
to a 4th iteration and runs `sample`; 02's CelebA-HQ generator runs with FAN masks; the 02 toy
trains 300 iterations in fp32 (seeds 0 and 1) and in bf16, and the loss averages are compared
(gap); the `--bench` line of every script is printed at the end. Well under 10 minutes on
one H100/H200. The CPU suite's fake-CUDA tier (test_fake_cuda.py) checks devices and dtypes of the
same paths without a GPU; this file checks what needs one: kernels, backward passes, memory, speed.

Dry run of this file's logic on the CPU, with tiny widths: GPU_CHECK_DEVICE=cpu python -m pytest
-m cuda -q (what it cannot check there: the CUDA kernels, memory and speed)."""
import json
import os

import pytest
import torch

from conftest import load_script
from data import fan as data_fan
from data import toy

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CPU_DRY = DEVICE == "cpu"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# script: (flags of the real setting, tiny widths for the CPU dry run)
REAL = {
    "01_stargan_v1": (["--img-size", "128", "--batch", "16"],
                      ["--img-size", "32", "--g-conv-dim", "4", "--d-conv-dim", "4",
                       "--g-repeat-num", "1", "--d-repeat-num", "4", "--batch", "4"]),
    "02_stargan_v2": (["--preset", "afhq", "--batch", "8"],
                      ["--preset", "afhq", "--img-size", "32", "--dim-in", "8",
                       "--max-conv-dim", "16", "--mapping-dim", "16", "--batch", "2"]),
    "02_celeba_hq": (["--preset", "celeba_hq", "--num-domains", "3", "--batch", "8"],
                     ["--preset", "celeba_hq", "--num-domains", "3", "--img-size", "64",
                      "--dim-in", "8", "--max-conv-dim", "16", "--mapping-dim", "16",
                      "--batch", "2"]),
    "03_bicyclegan_latent": (["--preset", "edges2shoes", "--batch", "2"],
                             ["--preset", "edges2shoes", "--img-size", "64", "--ngf", "8",
                              "--nef", "8", "--ndf", "8", "--batch", "2"]),
    "04_stylegan_mapping": (["--preset", "afhq", "--batch", "8"],
                            ["--preset", "afhq", "--img-size", "16", "--w-dim", "16",
                             "--fmap-base", "64", "--fmap-max", "16", "--batch", "4"]),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """256 px scenes (3 domain folders: 02, 03 on photos, 04), 178 px CelebA-layout faces (01),
    and a random-weight FAN file for the CelebA-HQ generator's masks (the masks' values do not
    matter here, their dtypes and devices do)."""
    root = tmp_path_factory.mktemp("gpu_check")
    toy.write_scenes(root / "scenes", 256, n_train=8, n_val=4, seed=0)
    toy.write_faces(root / "faces", 178, n=80, seed=0)
    torch.save({"state_dict": data_fan.FAN().state_dict()}, root / "wing.ckpt")
    return root


def flags_for(name, data):
    real, tiny = REAL[name]
    folder = data / ("faces" if name.startswith("01") else "scenes")
    extra = ["--wing", str(data / "wing.ckpt")] if name == "02_celeba_hq" else []
    return [*(tiny if CPU_DRY else real), "--data", str(folder), "--device", DEVICE, *extra]


def script_of(name):
    return load_script("02_stargan_v2" if name.startswith("02") else name)


def finite_log(out):
    rows = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert rows, "nothing logged"
    for row in rows:
        for k, v in row.items():
            assert v == v and abs(v) < float("inf"), (k, row)
    return rows


@pytest.mark.parametrize("amp", ["--amp", "--no-amp"])
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_setting_trains_saves_resumes_samples(name, amp, data, tmp_path):
    mod, out = script_of(name), tmp_path / "run"
    run = flags_for(name, data) + ["--out", str(out), amp, "--log-every", "1", "--sample-every",
                                   "3", "--save-every", "3"]
    mod.main(run + ["--total-iters", "3"])
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3
    mod.main(run + ["--total-iters", "4", "--resume", "auto"])
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 4 and [r["step"] for r in finite_log(out)] == [1, 2, 3, 4]
    for k, net in state["nets"].items():
        assert all(torch.isfinite(t).all() for t in net.values() if t.is_floating_point()), k
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    img = next((data / ("faces/images" if name.startswith("01") else "scenes/val/day")).iterdir())
    sample = {"01_stargan_v1": ["--src", str(img)], "02_stargan_v2": ["--src", str(img),
              "--domain", "1"], "02_celeba_hq": ["--src", str(img), "--domain", "1", "--wing",
              str(data / "wing.ckpt")]}.get(name, [])
    mod.main(["sample", "--ckpt", str(out / "last.pt"), "--out", str(out), "--device", DEVICE,
              *sample])
    written = {p for p in out.rglob("*") if p.is_file()
               and before.get(p) != p.stat().st_mtime_ns}  # new or rewritten (04 redraws figures)
    assert any(p.suffix in (".png", ".jpg", ".gif") for p in written), written
    if name == "02_celeba_hq":
        assert (out / "sample" / "masks.png").is_file()


TOY_ITERS, TAIL = 300, 100  # the 02 toy's iterations; the last TAIL are averaged


def toy_means(out, amp, seed, device=DEVICE):
    """-> {term: mean over the last TAIL iterations} of a 02 toy run (log every 10)."""
    m = load_script("02_stargan_v2")
    m.main(["--out", str(out), amp, "--seed", str(seed), "--device", device, "--total-iters",
            str(TOY_ITERS), "--log-every", "10", "--sample-every", str(TOY_ITERS),
            "--save-every", str(TOY_ITERS)])
    rows = [r for r in finite_log(out) if r["step"] > TOY_ITERS - TAIL]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("step", "time")}


def gap(a, b):
    """How far two runs' loss averages lie apart: per term |a − b| / (|a| + |b| + 0.02), in [0, 1)
    -> (mean over terms, max over terms, the term of the max). GAN runs diverge step by step under
    any change of rounding, so per-step losses cannot be compared; averages can."""
    r = {k: abs(a[k] - b[k]) / (abs(a[k]) + abs(b[k]) + 0.02) for k in a if k != "G/lambda_ds"}
    worst = max(r, key=r.get)
    return sum(r.values()) / len(r), r[worst], worst


# The criterion: gap(fp32, other) has mean ≤ 0.15 and max ≤ 0.5. Chosen from five 300-iteration
# runs of the 02 toy on the CPU (CPU bf16 autocast): fp32 seeds 1 and 2 against seed 0 gave
# mean 0.063 / 0.096, max 0.17 / 0.29; bf16 0.071 / 0.16; a broken bf16 path (R1 logged but not
# applied) 0.21 / 0.79.
GAP_MEAN, GAP_MAX = 0.15, 0.5


def test_02_toy_bf16_trains_like_fp32(tmp_path, capsys):
    """The 02 toy for TOY_ITERS iterations: fp32 seeds 0 and 1, bf16 seed 0. fp32 against itself
    under another seed must pass the criterion too, or the criterion is wrong for this GPU."""
    fp32, other, bf16 = (toy_means(tmp_path / f"{amp}{seed}", amp, seed) for amp, seed in (
        ("--no-amp", 0), ("--no-amp", 1), ("--amp", 0)))
    seeds, amp = gap(fp32, other), gap(fp32, bf16)
    with capsys.disabled():  # shown without -s: part of what the check reports
        print(f"\n02 toy, gap to fp32 (mean, max, term): fp32 seed 1 {seeds[0]:.3f} {seeds[1]:.3f} "
              f"{seeds[2]} | bf16 {amp[0]:.3f} {amp[1]:.3f} {amp[2]}")
    assert seeds[0] <= GAP_MEAN and seeds[1] <= GAP_MAX, f"fp32 vs fp32 seed 1: {seeds}"
    assert amp[0] <= GAP_MEAN and amp[1] <= GAP_MAX, f"bf16 vs fp32: {amp}"


@pytest.mark.parametrize("name", sorted(REAL))
def test_bench_line(name, data, capsys):
    real, tiny = REAL[name]
    flags = [f for f in (tiny if CPU_DRY else real) if not f.startswith("--data")]
    extra = ["--wing", str(data / "wing.ckpt")] if name == "02_celeba_hq" else []
    script_of(name).main(["--bench", "--bench-iters", "3" if CPU_DRY else "20",
                          "--device", DEVICE, *flags, *extra])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bench")][-1]
    with capsys.disabled():  # shown without -s: these lines are what the check reports
        print(f"\n{name}: {line}")
    assert "it/s" in line and (CPU_DRY or "GiB" in line)

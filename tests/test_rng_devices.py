"""What differs by device and by how often a run samples: random number generators and the current
GPU. None of these tests needs a GPU: CUDA's generators and device calls are patched, or tensors
that claim cuda:0 are made with torch's FakeTensorMode.

- A run's trajectory never depends on --sample-every or --log-every (all four scripts).
- Data loading never touches a CUDA generator (every rank's GPU draws must stay in step).
- RNG states restore whatever map_location read the checkpoint, and from a machine with more GPUs.
- --device cuda:N makes that GPU current, and fp32 on CUDA means IEEE fp32 (no TF32)."""
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode

import common
from conftest import build_all, load_script
from data import datasets

# script: flags of a tiny run (no loader workers); 03 and 04 read a folder of 8 images
RUNS = {
    "01_stargan_v1": ["--img-size", "32", "--g-conv-dim", "4", "--d-conv-dim", "4",
                      "--g-repeat-num", "1", "--d-repeat-num", "4", "--batch", "4"],
    "02_stargan_v2": ["--dim-in", "4", "--max-conv-dim", "8", "--mapping-dim", "16",
                      "--batch", "2"],
    "03_bicyclegan_latent": ["--img-size", "64", "--ngf", "4", "--nef", "4", "--ndf", "4",
                             "--batch", "2", "--num-workers", "0"],
    "04_stylegan_mapping": ["--img-size", "16", "--w-dim", "16", "--fmap-base", "64",
                            "--fmap-max", "16", "--batch", "4", "--num-workers", "0"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_trajectory_does_not_depend_on_sample_or_log_steps(name, tmp_path, monkeypatch):
    """3 steps with no sample grid or log line before the end, and with both after every step
    (02: the toy oracle too): the same weights, bit for bit."""
    S, data = load_script(name), []
    if name[:2] in ("03", "04"):  # any folder of photos (03: A = their edge maps)
        folder, g = tmp_path / "imgs", torch.Generator().manual_seed(0)
        folder.mkdir()
        for i in range(8):
            px = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
            Image.fromarray(px.numpy()).save(folder / f"{i}.png")
        data = ["--data", str(folder)]
    if name.startswith("01"):  # the end-of-run scores: not part of the trajectory, and slow
        monkeypatch.setattr(S, "oracle_judge", lambda *a: None)
    weights = []
    for every in ("1000", "1"):
        out = tmp_path / f"every{every}"
        S.main(RUNS[name] + data + ["--out", str(out), "--total-iters", "3", "--save-every",
                                    "1000", "--sample-every", every, "--log-every", every])
        state = torch.load(out / "last.pt", weights_only=True)
        weights.append({f"{n}.{k}": t for n, sd in state["nets"].items() for k, t in sd.items()})
    base, other = weights
    assert other.keys() == base.keys()
    differ = [k for k in base if not torch.equal(base[k], other[k])]
    assert not differ, f"samples and log lines after every step changed {differ[:3]}"


class _Draws(torch.utils.data.Dataset):
    """Each item draws from the global CPU generator, as random transforms do."""
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.rand(3)


def test_data_loading_never_touches_a_cuda_generator(monkeypatch):
    calls = []
    for fn in ("manual_seed", "manual_seed_all"):  # what torch.manual_seed calls for the GPUs
        monkeypatch.setattr(torch.cuda, fn, lambda *a, _fn=fn: calls.append(_fn))
    batches = datasets.step_loader(_Draws(), 4, seed=0)
    first = [next(batches) for _ in range(3)]
    again = datasets.step_loader(_Draws(), 4, seed=0)
    assert all(torch.equal(a, next(again)) for a in first)  # keyed: the same draws again
    assert not torch.equal(first[0], first[1])
    assert calls == [], f"the sampler reseeded CUDA generators {len(calls)} times"


def fake_cuda(t):
    """A tensor that claims cuda:0 (torch.load(map_location="cuda") on a GPU machine)."""
    mode = FakeTensorMode()
    fake = mode.from_tensor(t)
    with mode:
        return fake.to("cuda")


def cpu_bytes_only(name, record):
    """torch's RNG setters accept CPU byte tensors only (TypeError otherwise), on every build."""
    def setter(state, device="cuda"):
        if state.device.type != "cpu" or state.dtype != torch.uint8:
            raise TypeError(f"{name}: RNG state must be a torch.ByteTensor, got {state.device}")
        if device not in ("cuda", 0, torch.device("cuda", 0)):  # one GPU on this machine
            raise IndexError(f"{name}: no GPU {device}")
        record.append((name, state.clone()))
    return setter


def patched_restore(monkeypatch, rng):
    """load_checkpoint of a file whose RNG part is rng, on a machine with one (patched) GPU;
    -> the states handed to torch's setters."""
    record = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the latter's
        monkeypatch.setattr(module, "set_rng_state", cpu_bytes_only("cuda", record))
    cpu_setter = cpu_bytes_only("cpu", record)
    monkeypatch.setattr(torch, "set_rng_state", lambda s: cpu_setter(s, 0))
    state = {"nets": {}, "opts": {}, "step": 3, "rng": rng}
    monkeypatch.setattr(common, "read_checkpoint", lambda *a, **kw: state)
    assert common.load_checkpoint("last.pt", {}, map_location="cuda")["step"] == 3
    return record


def test_rng_states_restore_from_a_checkpoint_read_onto_the_gpu(monkeypatch):
    cpu_state, gpu_state = torch.get_rng_state(), torch.randint(256, (16,), dtype=torch.uint8)
    rng = {"python": list(common.random.getstate()), "torch": fake_cuda(cpu_state),
           "cuda": [fake_cuda(gpu_state)]}  # map_location=device: every tensor on the GPU
    with pytest.raises(TypeError):  # what the unconverted state meets
        cpu_bytes_only("cpu", [])(rng["torch"], 0)
    record = patched_restore(monkeypatch, rng)
    assert [name for name, _ in record] == ["cpu", "cuda"]


def test_resume_from_a_machine_with_more_gpus(monkeypatch):
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]  # 8 GPUs' states
    rng = {"python": list(common.random.getstate()), "torch": torch.get_rng_state(),
           "cuda": saved}
    record = patched_restore(monkeypatch, rng)
    assert [name for name, _ in record] == ["cpu", "cuda"]
    assert torch.equal(record[1][1], saved[0])  # the training GPU's state (a plain run: cuda:0)


def test_device_flag_makes_that_gpu_current_and_fp32_exact(monkeypatch):
    current = []

    def set_device(d):  # torch's rule: a device with an index (torch.device("cuda") raises)
        if torch.device(d).index is None:
            raise ValueError(f"Expected a torch.device with a specified index, but got: {d}")
        current.append(torch.device(d))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert common.pick_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]  # synchronize() and memory stats act on it
    assert torch.backends.cudnn.allow_tf32 is False  # --no-amp: IEEE fp32 convolutions
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert common.pick_device("cpu") == torch.device("cpu") and len(current) == 1
    for name in ("auto", "cuda"):  # the default, and a GPU without an index: the current one
        assert common.pick_device(name) == torch.device("cuda", 0) == current[-1]


def test_04_compile_reaches_what_the_steps_call(monkeypatch):
    """--compile: the steps call f and g (G.mapping, G.synthesis), never G.forward; compiling G
    alone compiled nothing that trains. torch.compile is replaced by a call counter."""
    sg, called = load_script("04_stylegan_mapping"), []

    def counting_compile(fn, *args, **kwargs):
        return lambda *a, **kw: (called.append(fn.__self__.__class__.__name__), fn(*a, **kw))[1]

    monkeypatch.setattr(torch, "compile", counting_compile)
    cfg = sg.Config(img_size=16, w_dim=16, fmap_base=64, fmap_max=16, batch=4, amp=False,
                    compile=True)
    G, D, G_ema, opt_G, opt_D = build_all(sg, cfg, torch.device("cpu"))
    sg.d_step(G, D, opt_D, torch.rand(4, 3, 16, 16) * 2 - 1, cfg)
    sg.g_step(G, D, opt_G, 4, cfg, torch.device("cpu"))
    assert {"MappingNetwork", "Synthesis"} <= set(called)


def test_03_dropout_is_one_path_at_any_n(monkeypatch):
    """03's Dropout draws its mask with bernoulli_ in one process too (F.dropout is a fused CUDA
    kernel with RNG use of its own: one and N processes would differ on GPUs), and equals
    F.dropout's arithmetic on the CPU: the same mask, kept values × 1 / (1 − p)."""
    bg = load_script("03_bicyclegan_latent")
    x = torch.randn(4, 8, 3, 3)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.5, training=True)
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **kw: 1 / 0)
    drop = bg.Dropout(0.5)
    torch.manual_seed(5)
    assert torch.equal(drop(x), expected)
    keep = (torch.rand_like(x) < 0.5).float()  # a mask drawn by the caller is the one applied
    assert torch.equal(drop(x, keep), x * keep * 2)
    assert torch.equal(drop.eval()(x), x) and torch.equal(drop(x, keep), x)


def test_03_step_drawn_dropout_masks_are_the_ones_forward_would_draw():
    """The step draws G's dropout masks up front (Generator.dropout_masks) so that torchrun can
    shard them; in one process they are the numbers G's forward draws itself: same shapes, same
    order (innermost level first), so the trajectory is that of plain dropout."""
    bg = load_script("03_bicyclegan_latent")
    torch.manual_seed(0)
    G = bg.Generator(ngf=4, img_size=128).train()  # 7 levels; dropout in the 2 under the innermost
    A, z = torch.rand(3, 1, 128, 128) * 2 - 1, torch.randn(3, 8)
    torch.manual_seed(7)
    masks = G.dropout_masks(3, 128, 128)
    assert [tuple(m.shape) for m in masks] == [(3, 32, 4, 4), (3, 32, 8, 8)]  # inner first
    x_given = G(A, z, masks)
    torch.manual_seed(7)
    assert torch.equal(x_given, G(A, z))  # drawn inside: the same numbers
    assert not torch.equal(x_given, G(A, z, G.dropout_masks(3, 128, 128)))  # masks matter

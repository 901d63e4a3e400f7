"""data/fan.py's FAN, face_masks and load_fan: StarGAN v2's frozen face-alignment network and its
masks."""
import pytest
import torch

from common import UserError
from conftest import LAYOUTS
from data import fan as data_fan

REF = LAYOUTS / "stargan_v2_fan_wing.txt"  # clovaai/stargan-v2 core/wing.py, wing.ckpt


def test_fan_layout_matches_official_wing_ckpt():
    fan = data_fan.FAN()
    assert sum(p.numel() for p in fan.parameters()) == 6_333_603
    assert sum(b.numel() for b in fan.buffers()) == 15_031
    # every key and shape of the official module, in order
    want = [ln.split(maxsplit=2)[1:] for ln in REF.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    ours = [[k, str(tuple(v.shape))] for k, v in fan.state_dict().items()]
    assert len(want) == 336 and [[k, s.replace(" ", "")] for k, s in want] == \
           [[k, s.replace(" ", "")] for k, s in ours]


def test_fan_is_frozen_and_stays_in_eval_mode():
    fan = data_fan.FAN(width=32)
    fan.train()
    assert not fan.training and not any(m.training for m in fan.modules())
    assert not any(p.requires_grad for p in fan.parameters())
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    heat = fan.heatmaps(x)
    assert heat.shape == (2, 98, 256, 256) and heat.dtype == torch.float32
    assert fan(torch.rand(1, 3, 256, 256)).shape == (1, 99, 64, 64)
    masks = fan.masks(x)
    assert [tuple(m.shape) for m in masks] == [(2, 1, 256, 256)] * 2
    assert all(0 <= m.min() and m.max() <= 1 for m in masks)
    assert torch.equal(fan.masks(x[:1])[0], masks[0][:1])  # per-sample: running BN statistics


def _blob(row, col):
    """A landmark heatmap (256, 256): 1 at (row, col), 0.5 on its 4 neighbours, 0.05 around."""
    h = torch.zeros(256, 256)
    h[row - 3:row + 4, col - 3:col + 4] = 0.05  # below the 0.1 threshold: truncated to 0
    h[row - 1:row + 2, col] = h[row, col - 1:col + 2] = 0.5
    h[row, col] = 1.0
    return h


def _masks_of(landmark, row=120, col=100):
    heat = torch.zeros(1, 98, 256, 256)
    heat[0, landmark] = _blob(row, col)
    return [m[0, 0] for m in data_fan.face_masks(heat)]


@pytest.mark.parametrize("landmark,rows_up,power,in_level2", [
    (10, 0, 3, False),    # chin: kept, sharpened (power 3), not in the second-level mask
    (40, -7, 2, False),   # eyebrow: moved down 7 rows, power 2, dropped at level 2
    (57, 8, 4, True),     # nostril: up 8, power 4, kept at level 2
    (79, -8, 4, False),   # upper lip: down 8, power 4
    (85, 8, 4, False),    # lower lip: up 8
    (90, -2, 3, False),   # inner lip: down 2, power 3
    (53, 4, 1, True),     # nose ridge: up 4, unchanged values
    (51, 0, 1, True),     # nose top: as it is
    (96, 0, 1, True),     # eye pupil: as it is
])
def test_face_masks_follow_the_official_recipe(landmark, rows_up, power, in_level2):
    full, level2 = _masks_of(landmark)
    r, c = 120 - rows_up, 100
    want = torch.zeros(256, 256)
    want[r - 1:r + 2, c] = want[r, c - 1:c + 2] = (0.5 / (1 + 1e-6)) ** power
    want[r, c] = (1 / (1 + 1e-6)) ** power
    assert torch.allclose(full, want, atol=1e-6)  # zero wherever the (truncated) heatmap is zero
    assert torch.allclose(level2, want if in_level2 else torch.zeros(256, 256), atol=1e-6)


@pytest.mark.parametrize("landmark", [0, 5, 25, 32, 33, 46, 76, 82])
def test_face_masks_drop_outer_jaw_and_corner_landmarks(landmark):
    full, level2 = _masks_of(landmark)
    assert full.abs().max() == 0 and level2.abs().max() == 0


def test_face_masks_eyes_and_sum_clamped():
    full, level2 = _masks_of(65)  # an eye landmark: a sharp copy 8 rows down + a copy 24 down
    assert full[128, 100] == pytest.approx(1.0, abs=1e-5)  # 120 + 8, power 3
    assert full[144, 100] == pytest.approx(1.0, abs=1e-5)  # 120 + 24, as it is
    assert full[145, 100] == pytest.approx(0.5, abs=1e-5) and full[129, 100] == \
        pytest.approx(0.125, abs=1e-5)
    assert torch.equal(full, level2)
    heat = torch.zeros(1, 98, 256, 256)
    heat[0, 96] = heat[0, 97] = _blob(50, 50)  # two maps on one spot: the sum clamps at 1
    assert data_fan.face_masks(heat)[0].max() == 1.0


def test_load_fan_round_trip_extra_missing_and_misshaped(tmp_path):
    src = data_fan.FAN()
    for p in src.state_dict().values():
        if p.is_floating_point():
            p.copy_(torch.randn_like(p))
    state = dict(src.state_dict(), extra_head=torch.zeros(3))  # extra entries are ignored
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "wing.ckpt")
    fan = data_fan.load_fan(tmp_path / "wing.ckpt")
    assert not fan.training
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 fan.state_dict().values()))
    del state["l0.weight"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="no entry 'l0.weight'.*download.py wing"):
        data_fan.load_fan(tmp_path / "missing.ckpt")
    state["l0.weight"] = torch.zeros(68, 256, 1, 1)  # e.g. a 68-landmark FAN
    torch.save({"state_dict": state}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match=r"'l0.weight' is \(68, 256, 1, 1\), expected \(99"):
        data_fan.load_fan(tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="no FAN weights.*download.py wing"):
        data_fan.load_fan(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        data_fan.load_fan(tmp_path / "junk.ckpt")


# -----------------------------------------------------------------------------------------------
# Face alignment (02's `align` mode): .npy/.npz reader, landmark read-out, the similarity transform
# -----------------------------------------------------------------------------------------------
def _npy(values, descr="<f4", fortran=False, version=1):
    """A .npy file written byte by byte: magic, version, header length, dict header, raw data."""
    fmt = {"<f4": "<f", "<f8": "<d", "<i4": "<i", ">f4": ">f"}[descr]
    shape = (len(values), len(values[0]))
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    n = 4 if version >= 2 else 2
    header += " " * (-(10 + len(header) + n - 2 + 1) % 64) + "\n"
    import struct
    data = b"".join(struct.pack(fmt, v) for row in values for v in row)
    return (b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(n, "little")
            + header.encode("latin1") + data)


@pytest.mark.parametrize("descr,version", [("<f4", 1), ("<f8", 1), ("<f8", 2)])
def test_npz_reader_float32_float64(tmp_path, descr, version):
    import zipfile
    values = [[1.5, -2.25], [3.0, 1e-3], [0.0, 255.0]]
    with zipfile.ZipFile(tmp_path / "lm.npz", "w") as z:
        z.writestr("mean.npy", _npy(values, descr, version=version))
        z.writestr("other.npy", _npy([[7.0]], descr))
    arrays = data_fan.read_npz(tmp_path / "lm.npz")
    assert sorted(arrays) == ["mean", "other"]
    want = torch.tensor(values, dtype=torch.float32 if descr == "<f4" else torch.float64)
    assert torch.equal(data_fan.read_npz(tmp_path / "lm.npz", "mean"), want)
    (tmp_path / "a.npy").write_bytes(_npy(values, descr, version=version))
    assert torch.equal(data_fan.read_npz(tmp_path / "a.npy")[""], want)


@pytest.mark.parametrize("fortran,descr", [(True, "<f4"), (False, ">f4")])
def test_npz_reader_reads_any_order(tmp_path, fortran, descr):
    """numpy.load reads Fortran order and big-endian floats; out come native, C-order tensors."""
    values = [[1.0, 2.0], [3.0, 4.0]]
    flat = [v for col in zip(*values) for v in col] if fortran else None  # column-major bytes
    raw = _npy([flat[:2], flat[2:]] if fortran else values, descr, fortran=fortran)
    (tmp_path / "x.npy").write_bytes(raw)
    got = data_fan.read_npz(tmp_path / "x.npy")[""]
    assert torch.equal(got, torch.tensor(values)) and got.is_contiguous()


@pytest.mark.parametrize("raw,msg", [
    (_npy([[1, 2]], "<i4"), "dtype int32; floating-point"),
    (b"PK-not-numpy", "cannot read"),
    (_npy([[1.0, 2.0]])[:-3], "cannot read")])
def test_npz_reader_refuses_what_it_cannot_read(tmp_path, raw, msg):
    (tmp_path / "x.npy").write_bytes(raw)
    with pytest.raises(UserError, match=msg):
        data_fan.read_npz(tmp_path / "x.npy")
    import zipfile
    with zipfile.ZipFile(tmp_path / "lm.npz", "w") as z:
        z.writestr("mean.npy", _npy([[1.0, 2.0]]))
    with pytest.raises(UserError, match=r"no array 'avg' \(has \['mean'\]\)"):
        data_fan.read_npz(tmp_path / "lm.npz", "avg")


def test_landmark_readout_quarter_pixel_toward_higher_neighbour():
    heat = torch.zeros(1, 3, 64, 64)
    heat[0, 0, 20, 30], heat[0, 0, 20, 31], heat[0, 0, 19, 30] = 1.0, 0.6, 0.3  # right, above
    heat[0, 1, 40, 10], heat[0, 1, 40, 9], heat[0, 1, 41, 10] = 1.0, 0.2, 0.7  # left, below
    heat[0, 2, 0, 63] = 1.0  # on the border: no quarter step
    xy = data_fan.heat_peaks(heat)[0]
    assert xy.tolist() == [[30.75, 20.25], [10.25, 40.75], [63.5, 0.5]]
    fan = data_fan.FAN(width=16)
    lm = fan.landmarks(torch.rand(2, 3, 128, 128) * 2 - 1)
    assert lm.shape == (2, 98, 2) and 0 <= lm.min() and lm.max() <= 128  # pixels of the input


def _reference_landmarks():
    """A plausible 98-point face at 256 px (the layout of celeba_lm_mean.npz), (98, 2) as (x, y)."""
    g = torch.Generator().manual_seed(0)
    lm = torch.rand(98, 2, generator=g) * 100 + 78
    lm[60:68], lm[96] = torch.tensor([95.0, 110]) + torch.randn(8, 2, generator=g), \
        torch.tensor([95.0, 110])
    lm[68:76], lm[97] = torch.tensor([160.0, 110]) + torch.randn(8, 2, generator=g), \
        torch.tensor([160.0, 110])
    lm[76], lm[82] = torch.tensor([105.0, 185]), torch.tensor([150.0, 185])
    return lm


@pytest.mark.parametrize("angle,scale,shift", [(0.0, 1.0, (0, 0)), (0.4, 0.7, (-30, 12)),
                                               (-0.9, 1.8, (50, -40)), (2.5, 1.2, (5, 5))])
def test_similarity_maps_a_moved_face_back_onto_the_reference(angle, scale, shift):
    ref = _reference_landmarks().double()
    c, s = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    moved = (ref - 128) @ rot.T * scale + 128 + torch.tensor(shift)
    m = data_fan.similarity_to(moved, ref)
    back = torch.cat([moved, torch.ones(98, 1, dtype=torch.float64)], 1) @ m.T
    assert (back[:, :2] - ref).abs().max() < 0.5  # pixels
    assert torch.allclose(m[:2, :2] @ m[:2, :2].T, torch.eye(2, dtype=torch.float64) / scale ** 2)


def test_aligning_an_aligned_face_changes_it_little():
    ref = _reference_landmarks()
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=256,
                                        mode="bilinear")[0] * 2 - 1  # smooth content
    out = data_fan.align_face(x, ref, ref)
    assert out.shape == (3, 256, 256)
    assert (out - x).abs().max() < 1e-4  # the identity warp: the image comes back
    moved = data_fan.align_face(x, ref + torch.tensor([6.0, -4.0]), ref)  # landmarks 6 px right
    assert torch.allclose(moved[:, 20:-20, 20:-20], x[:, 16:-24, 26:-14], atol=1e-4)

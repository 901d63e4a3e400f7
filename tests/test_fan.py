"""common.FAN, face_masks and load_fan: StarGAN v2's frozen face-alignment network and its masks."""
from pathlib import Path

import pytest
import torch

import common
from common import UserError

REF = Path("/work/shared/reference/stargan_v2_fan_wing.txt")


def test_fan_layout_matches_official_wing_ckpt():
    fan = common.FAN()
    assert sum(p.numel() for p in fan.parameters()) == 6_333_603
    assert sum(b.numel() for b in fan.buffers()) == 15_031
    if REF.exists():  # every key and shape of the official module, in order
        want = [ln.split(maxsplit=2)[1:] for ln in REF.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
        ours = [[k, str(tuple(v.shape))] for k, v in fan.state_dict().items()]
        assert [[k, s.replace(" ", "")] for k, s in want] == \
               [[k, s.replace(" ", "")] for k, s in ours]


def test_fan_is_frozen_and_stays_in_eval_mode():
    fan = common.FAN(width=32)
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
    return [m[0, 0] for m in common.face_masks(heat)]


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
    assert common.face_masks(heat)[0].max() == 1.0


def test_load_fan_round_trip_extra_missing_and_misshaped(tmp_path):
    src = common.FAN()
    for p in src.state_dict().values():
        if p.is_floating_point():
            p.copy_(torch.randn_like(p))
    state = dict(src.state_dict(), extra_head=torch.zeros(3))  # extra entries are ignored
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "wing.ckpt")
    fan = common.load_fan(tmp_path / "wing.ckpt")
    assert not fan.training
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 fan.state_dict().values()))
    del state["l0.weight"]
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(UserError, match="no entry 'l0.weight'.*download.py wing"):
        common.load_fan(tmp_path / "missing.ckpt")
    state["l0.weight"] = torch.zeros(68, 256, 1, 1)  # e.g. a 68-landmark FAN
    torch.save({"state_dict": state}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match=r"'l0.weight' is \(68, 256, 1, 1\), expected \(99"):
        common.load_fan(tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="no FAN weights.*download.py wing"):
        common.load_fan(tmp_path / "absent.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        common.load_fan(tmp_path / "junk.ckpt")

import numpy as np
import pytest
import torch

from data_tools.transforms import (ClipTransform, center_crop_box, crop_resize,
                                   multiscale_crop_box, normalize_batch, normalize_video,
                                   random_resized_crop_box, stack_clips, three_crop_boxes)


@pytest.fixture
def frames() -> torch.Tensor:
    """8 frames of 60x80 random texture: frame t is frame 0 plus t (so crops are comparable)."""
    base = torch.randint(0, 200, (1, 60, 80, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    return base + torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1)


def _inside(box, height, width):
    top, left, h, w = box
    return top >= 0 and left >= 0 and top + h <= height and left + w <= width and h > 0 < w


def test_multiscale_crop_sizes_and_positions():
    rng = np.random.default_rng(0)
    sides = [240, 210, 180, 158]  # int(240 * s) for s in (1, .875, .75, .66)
    positions: dict[tuple[int, int], set] = {}
    for _ in range(1000):
        top, left, h, w = box = multiscale_crop_box(240, 320, 224, rng)
        assert _inside(box, 240, 320)
        assert abs(sides.index(h) - sides.index(w)) <= 1  # at most one scale step apart
        positions.setdefault((h, w), set()).add((top, left))
    assert len(positions) == 10  # 4 square pairs + 6 one-step-distorted pairs
    assert max(len(p) for p in positions.values()) == 13  # the 13 fixed positions
    # the positions of the 240x240 crop: quarter steps of the 80 free columns
    assert {left for _, left in positions[(240, 240)]} == {0, 20, 40, 60, 80}


def test_multiscale_snaps_sizes_close_to_output():
    rng = np.random.default_rng(0)
    sizes = {multiscale_crop_box(256, 256, 224, rng)[2] for _ in range(300)}
    # int(256 * .875) = 224 already; int(256 * .66) = 168, int(256 * .75) = 192
    assert sizes == {256, 224, 192, 168}
    sizes = {multiscale_crop_box(226, 300, 224, rng)[2] for _ in range(300)}
    assert sizes == {224, 197, 169, 149}  # 226 is within 3 pixels of 224: snapped
    sizes = {multiscale_crop_box(227, 300, 224, rng)[2] for _ in range(300)}
    assert 227 in sizes  # 3 pixels away: kept


def test_random_resized_crop_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        box = random_resized_crop_box(120, 160, rng)
        assert _inside(box, 120, 160)
        _, _, h, w = box
        assert 0.08 * 0.9 <= h * w / (120 * 160) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (h, w) == (120, 160)


def test_three_crops_span_the_long_side():
    boxes = three_crop_boxes(60, 100)
    assert boxes == [(0, 0, 60, 60), (0, 20, 60, 60), (0, 40, 60, 60)]
    assert three_crop_boxes(100, 60)[2] == (40, 0, 60, 60)
    assert center_crop_box(60, 100) == boxes[1]


def test_crop_resize_applies_one_box_to_every_frame_and_stays_uint8(frames):
    out = crop_resize(frames, (10, 20, 40, 40), 32)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (8, 3, 32, 32)
    offsets = out.int() - out[:1].int()
    # frames differ by a constant, so the same crop differs by (about) that constant
    for t in range(8):
        assert (offsets[t] - t).abs().max() <= 1
    exact = crop_resize(frames, (10, 20, 32, 32), 32)
    torch.testing.assert_close(exact, frames[:, 10:42, 20:52].permute(0, 3, 1, 2))
    flipped = crop_resize(frames, (10, 20, 32, 32), 32, flip=True)
    torch.testing.assert_close(flipped, exact.flip(-1))
    picked = crop_resize(frames, (10, 20, 32, 32), 32, indices=torch.tensor([5, 5, 0]))
    torch.testing.assert_close(picked, exact[[5, 5, 0]])


def test_normalize_layout_and_values(frames):
    clip = frames[:, :4, :5].permute(0, 3, 1, 2)  # (T, C, H, W), channels-last memory
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    pixels = stack_clips([clip, clip.flip(-1)])
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (2, 3, 8, 4, 5)
    out = normalize_video(pixels, mean, std)
    assert out.dtype == torch.float32 and out.shape == pixels.shape and out.is_contiguous()
    expected = (frames[:, :4, :5].float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out[0], expected.permute(3, 0, 1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], out[0].flip(-1))
    assert normalize_video(out, mean, std) is out  # already normalised: returned as it is
    # the loader-side path (convert while gathering, into a given buffer): the same bits
    buffer = torch.full((2, 3, 8, 4, 5), float("nan"))
    batch = normalize_batch([clip, clip.flip(-1)], mean, std, out=buffer)
    assert batch is buffer and torch.equal(batch, out)
    assert torch.equal(normalize_video(pixels[0], mean, std), out[0])  # one clip (C, T, H, W)
    # a batch gathered into channels-last memory (as ClipCollator does): a (B, C, T, H, W)
    # view that normalises to the same contiguous bits
    channels_last = stack_clips([clip, clip.flip(-1)],
                                out=torch.empty(2, 8, 4, 5, 3, dtype=torch.uint8)
                                .permute(0, 4, 1, 2, 3))
    assert not channels_last.is_contiguous() and torch.equal(channels_last, pixels)
    from_view = normalize_video(channels_last, mean, std)
    assert from_view.is_contiguous() and torch.equal(from_view, out)
    with pytest.raises(TypeError, match="uint8"):
        normalize_video(pixels.long(), mean, std)


@pytest.mark.parametrize("crop", ["multiscale", "random_resized", "center"])
def test_clip_transform_train_stays_uint8(frames, crop):
    transform = ClipTransform(32, crop=crop, flip=True)
    out = transform.train(frames, np.random.default_rng(0))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (8, 3, 32, 32)
    out = transform.train(frames, np.random.default_rng(0), indices=torch.tensor([1, 2]))
    assert tuple(out.shape) == (2, 3, 32, 32)


def test_clip_transform_test_crops(frames):
    transform = ClipTransform(32)
    one = transform.test(frames, 1)
    three = transform.test(frames, 3)
    assert len(one) == 1 and len(three) == 3
    torch.testing.assert_close(one[0], three[1])
    assert not torch.equal(three[0], three[2])
    with pytest.raises(ValueError, match="1 or 3"):
        transform.test(frames, 2)
    with pytest.raises(ValueError, match="unknown training crop"):
        ClipTransform(32, crop="five")

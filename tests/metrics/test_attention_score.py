import numpy as np
import pytest

from absvl.metrics.attention import target_attention_ratio


def test_uniform_map_scores_one():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    assert target_attention_ratio(np.ones((4, 4)), mask) == pytest.approx(1.0)


def test_all_mass_on_target_scores_inverse_area_share():
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True  # one cell of a 4x4 map: area share 1/16
    attention = np.zeros((4, 4))
    attention[0, 0] = 5.0
    assert target_attention_ratio(attention, mask) == pytest.approx(16.0)
    attention = np.ones((4, 4))
    attention[0, 0] = 0.0  # no mass on the target
    assert target_attention_ratio(attention, mask) == 0.0


def test_partial_cells_are_weighted_by_coverage():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # a quarter of cell (0, 0) of a 2x2 map
    attention = np.array([[3.0, 1.0], [1.0, 1.0]])
    # mass share = 3 * 0.25 / 6 = 0.125 ; area share = 1/16
    assert target_attention_ratio(attention, mask) == pytest.approx(0.125 / (1 / 16))


def test_errors_and_empty_target():
    assert np.isnan(target_attention_ratio(np.ones((2, 2)), np.zeros((4, 4), bool)))
    with pytest.raises(ValueError, match="not a whole multiple"):
        target_attention_ratio(np.ones((3, 3)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="non-negative"):
        target_attention_ratio(-np.ones((2, 2)), np.ones((4, 4), bool))

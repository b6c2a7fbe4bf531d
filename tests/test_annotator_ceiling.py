"""The annotator ceiling: label noise alone keeps a perfect model below 100 % Dice."""

from __future__ import annotations

import pytest

from pcl_viewer.evaluate.phantom_eval import annotator_ceiling


@pytest.fixture(scope="module")
def ceiling():
    return annotator_ceiling(n=40, seed=5, size=64)


def test_the_ceiling_counts_both_groups(ceiling):
    assert ceiling["n_nf"] + ceiling["n_pe"] == ceiling["n"] == 40


def test_annotator_noise_keeps_even_a_perfect_model_below_100(ceiling):
    assert 80.0 < ceiling["dice"] < 99.5


def test_the_hidden_border_makes_effusion_labels_noisier(ceiling):
    assert ceiling["dice_pe"] < ceiling["dice_nf"]

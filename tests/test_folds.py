"""Folds grouped by patient and stratified by effusion; label budgets stratified, nested, fixed."""

import numpy as np
import pytest

from pcl_viewer.evaluate.folds import label_budget, patient_folds


def _cohort(n_patients: int = 90, seed: int = 0):
    rng = np.random.default_rng(seed)
    studies = rng.integers(1, 4, n_patients)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], studies)
    effusion = rng.random(len(patients)) < 0.33
    return effusion, patients


def test_no_patient_is_on_both_sides_and_every_image_is_tested_once():
    effusion, patients = _cohort()
    folds = patient_folds(effusion, patients, n_splits=5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested) == list(range(len(patients)))
    for tr, te in folds:
        assert not set(patients[tr]) & set(patients[te])


def test_folds_are_stratified_by_effusion():
    effusion, patients = _cohort(150)
    share = effusion.mean()
    for _, te in patient_folds(effusion, patients, n_splits=5, seed=0):
        assert abs(effusion[te].mean() - share) < 0.08


def test_same_seed_same_folds():
    effusion, patients = _cohort()
    a = patient_folds(effusion, patients, seed=3)
    b = patient_folds(effusion, patients, seed=3)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def train_fold():
    """``(effusion, training indices of fold 0)`` of a 150-patient cohort."""
    effusion, patients = _cohort(150)
    return effusion, patient_folds(effusion, patients, seed=0)[0][0]


def test_a_budget_has_its_size(train_fold):
    effusion, tr = train_fold
    assert len(label_budget(tr, effusion, 8, seed=0, fold=0)) == 8
    assert len(label_budget(tr, effusion, "32", seed=0, fold=0)) == 32


def test_budgets_are_nested_subsets_of_the_training_fold(train_fold):
    effusion, tr = train_fold
    b8 = label_budget(tr, effusion, 8, seed=0, fold=0)
    b32 = label_budget(tr, effusion, 32, seed=0, fold=0)
    assert set(b8) <= set(b32) <= set(tr)


def test_budgets_are_stratified_by_effusion(train_fold):
    effusion, tr = train_fold
    share = effusion[tr].mean()
    b32 = label_budget(tr, effusion, 32, seed=0, fold=0)
    assert abs(effusion[b32].sum() - 32 * share) <= 1.5
    assert 1 <= effusion[label_budget(tr, effusion, 8, seed=0, fold=0)].sum() <= 4


def test_a_budget_is_fixed_by_seed_and_fold(train_fold):
    effusion, tr = train_fold
    b32 = label_budget(tr, effusion, 32, seed=0, fold=0)
    assert np.array_equal(b32, label_budget(tr, effusion, 32, seed=0, fold=0))
    assert not np.array_equal(b32, label_budget(tr, effusion, 32, seed=0, fold=1))


def test_the_all_budget_is_the_whole_training_fold(train_fold):
    effusion, tr = train_fold
    assert np.array_equal(label_budget(tr, effusion, "all"), np.sort(tr))

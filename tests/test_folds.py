"""Folds grouped by patient and stratified by effusion; label budgets stratified, nested, fixed."""

import numpy as np

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


def test_budgets_are_subsets_sized_stratified_nested_and_deterministic():
    effusion, patients = _cohort(150)
    tr, _ = patient_folds(effusion, patients, seed=0)[0]
    b8 = label_budget(tr, effusion, 8, seed=0, fold=0)
    b32 = label_budget(tr, effusion, "32", seed=0, fold=0)
    assert len(b8) == 8 and len(b32) == 32
    assert set(b8) <= set(b32) <= set(tr)
    share = effusion[tr].mean()
    assert abs(effusion[b32].sum() - 32 * share) <= 1.5
    assert 1 <= effusion[b8].sum() <= 4
    assert np.array_equal(b8, label_budget(tr, effusion, 8, seed=0, fold=0))
    assert not np.array_equal(b32, label_budget(tr, effusion, 32, seed=0, fold=1))
    assert np.array_equal(label_budget(tr, effusion, "all"), np.sort(tr))

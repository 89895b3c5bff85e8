"""ImageNet-C arithmetic against hand-computed tables and the formulas written out naively."""
import pytest

from fan.robustness.metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_ERROR, ALL_CORRUPTIONS, EXTRA_CORRUPTIONS,
                                    SEVERITIES, STANDARD_CORRUPTIONS, summarize_corruption_errors)

# AlexNet mean errors (fractions) as published by hendrycks/robustness, typed in again as the reference.
ALEXNET_FRACTIONS = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
                     0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]


def test_constants_match_the_published_table():
    assert list(STANDARD_CORRUPTIONS) == list(ALEXNET_ERROR)
    assert [ALEXNET_ERROR[c] / 100 for c in STANDARD_CORRUPTIONS] == pytest.approx(ALEXNET_FRACTIONS, abs=1e-12)
    assert sum(ALEXNET_FRACTIONS) / 15 == pytest.approx(0.788993, abs=1e-6)  # the table's "mean of 15"
    assert ALEXNET_CLEAN_ERROR == pytest.approx(43.478)
    assert len(ALL_CORRUPTIONS) == 19 and not set(EXTRA_CORRUPTIONS) & set(STANDARD_CORRUPTIONS)


def test_alexnet_identical_table_gives_mce_100():
    # per-severity errors that differ but average to AlexNet's mean: CE uses sums over severities
    errors = {c: {s: ALEXNET_ERROR[c] + 2.0 * (s - 3) for s in SEVERITIES} for c in STANDARD_CORRUPTIONS}
    summary = summarize_corruption_errors(errors, clean_error=ALEXNET_CLEAN_ERROR)
    assert summary['mce'] == pytest.approx(100.0)
    assert summary['relative_mce'] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in summary['ce'].values())
    assert summary['incomplete'] == {}
    assert summary['corruption_set'] == '15 standard corruptions x 5 severities'


def test_hand_computed_table():
    # gaussian_noise 50..90 (mean 70), every other standard corruption at half AlexNet's error, clean 20 %
    errors = {c: {s: ALEXNET_ERROR[c] / 2 for s in SEVERITIES} for c in STANDARD_CORRUPTIONS}
    errors['gaussian_noise'] = {1: 50.0, 2: 60.0, 3: 70.0, 4: 80.0, 5: 90.0}
    summary = summarize_corruption_errors(errors, clean_error=20.0)
    assert summary['ce']['gaussian_noise'] == pytest.approx(100 * 70 / 88.6428)  # 78.9687
    assert summary['ce']['gaussian_noise'] == pytest.approx(78.96862, abs=1e-4)
    assert summary['ce']['fog'] == pytest.approx(50.0)
    assert summary['mce'] == pytest.approx((14 * 50.0 + 78.96862) / 15, abs=1e-4)  # 51.9312
    # relative CE written from the definition: sum_s (E - E_clean) / sum_s (E_alexnet - E_alexnet_clean)
    rel_gauss = sum(e - 20.0 for e in errors['gaussian_noise'].values()) / (5 * (88.6428 - 43.478))
    assert summary['relative_ce']['gaussian_noise'] == pytest.approx(100 * rel_gauss)
    assert summary['relative_ce']['gaussian_noise'] == pytest.approx(110.7057, abs=1e-3)  # 250 / (5 * 45.1648)
    naive_relative = [100 * sum(errors[c][s] - 20.0 for s in SEVERITIES) / (5 * (a * 100 - 43.478))
                      for c, a in zip(STANDARD_CORRUPTIONS, ALEXNET_FRACTIONS)]
    assert summary['relative_mce'] == pytest.approx(sum(naive_relative) / 15)
    # FAN's way: mean over the 75 per-severity ratios E_{s,c} / AlexNet_c gives the same mCE
    fan_style = sum(errors[c][s] / (100 * a) for c, a in zip(STANDARD_CORRUPTIONS, ALEXNET_FRACTIONS)
                    for s in SEVERITIES) / 75
    assert summary['mce'] == pytest.approx(100 * fan_style)
    accuracies = [100 - errors[c][s] for c in STANDARD_CORRUPTIONS for s in SEVERITIES]
    assert summary['mean_accuracy'] == pytest.approx(sum(accuracies) / 75)
    assert summary['retention'] == pytest.approx(100 * (sum(accuracies) / 75) / 80.0)


def test_extras_enter_mean_accuracy_but_never_mce():
    errors = {c: {s: 40.0 for s in SEVERITIES} for c in STANDARD_CORRUPTIONS}
    errors.update({c: {s: 90.0 for s in SEVERITIES} for c in EXTRA_CORRUPTIONS})
    summary = summarize_corruption_errors(errors, clean_error=25.0)
    assert set(summary['ce']) == set(STANDARD_CORRUPTIONS)
    only_standard = summarize_corruption_errors({c: errors[c] for c in STANDARD_CORRUPTIONS}, clean_error=25.0)
    assert summary['mce'] == pytest.approx(only_standard['mce'])
    assert summary['mean_accuracy'] == pytest.approx((75 * 60 + 20 * 10) / 95)  # 49.47, FAN's 19-corruption IN-C
    assert summary['mean_accuracy_standard'] == pytest.approx(60.0)
    assert summary['retention'] == pytest.approx(100 * summary['mean_accuracy'] / 75.0)
    assert summary['corruption_set'] == 'all 19 corruptions x 5 severities'


def test_subset_is_reported_incomplete_not_misleading():
    errors = {'gaussian_noise': {s: 60.0 for s in SEVERITIES}, 'contrast': {1: 30.0, 2: 50.0}}
    summary = summarize_corruption_errors(errors)
    assert summary['mce'] is None and summary['relative_mce'] is None and summary['retention'] is None
    assert 'contrast' in summary['incomplete']['mce'] and 'fog' in summary['incomplete']['mce']
    assert 'gaussian_noise' not in summary['incomplete']['mce']
    assert set(summary['ce']) == {'gaussian_noise'}  # contrast lacks severities 3-5: no CE
    assert summary['mean_accuracy'] == pytest.approx((5 * 40 + 70 + 50) / 7)
    assert summary['mean_accuracy_standard'] is None
    assert 'mean_accuracy' in summary['incomplete'] and 'clean' in summary['incomplete']['retention']
    assert summary['corruption_set'].startswith('subset: 7 cells')


def test_unknown_corruption_is_an_error():
    with pytest.raises(ValueError, match='gaussian_noize'):
        summarize_corruption_errors({'gaussian_noize': {1: 10.0}})

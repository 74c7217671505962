"""Validation metrics against textbook values and reference implementations."""

import numpy as np
import pytest
from scipy import stats

from bonedrr import metrics

# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges, and their Table 4 results.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


def test_icc_reproduces_shrout_and_fleiss_table_4():
    values = metrics.icc(SHROUT_FLEISS)
    assert values["icc_2_1"] == pytest.approx(0.29, abs=0.005)
    assert values["icc_3_1"] == pytest.approx(0.71, abs=0.005)
    assert values["icc_2_k"] == pytest.approx(0.62, abs=0.005)
    assert values["icc_3_k"] == pytest.approx(0.91, abs=0.005)


def test_icc_2_1_penalises_an_offset_that_icc_3_1_ignores():
    truth = np.linspace(0.5, 1.1, 20)
    shifted = metrics.agreement(truth + 0.1, truth)
    assert shifted["icc_3_1"] == pytest.approx(1.0)
    assert shifted["icc_2_1"] < 0.9
    assert shifted["pearson_r"] == pytest.approx(1.0)


def test_agreement_matches_scipy_and_hand_computed_values():
    rng = np.random.default_rng(4)
    truth = rng.uniform(0.45, 1.15, 40)
    prediction = truth + rng.normal(0.02, 0.05, 40)
    prediction[3] = np.nan  # dropped as a pair
    m = metrics.agreement(prediction, truth)
    keep = np.isfinite(prediction)
    d = prediction[keep] - truth[keep]
    assert m["n"] == 39
    assert m["pearson_r"] == pytest.approx(stats.pearsonr(prediction[keep], truth[keep]).statistic, rel=1e-12)
    assert m["mae"] == pytest.approx(np.abs(d).mean())
    assert m["rmse"] == pytest.approx(np.sqrt((d ** 2).mean()))
    assert m["bias"] == pytest.approx(d.mean())
    assert m["loa_high"] - m["loa_low"] == pytest.approx(2 * 1.96 * d.std(ddof=1))
    # Bland-Altman by hand on three pairs: differences 0.1, -0.1, 0.3 -> bias 0.1, SD 0.2.
    ba = metrics.bland_altman([1.1, 0.9, 1.3], [1.0, 1.0, 1.0])
    assert ba["bias"] == pytest.approx(0.1) and ba["sd_diff"] == pytest.approx(0.2)
    assert ba["loa_low"] == pytest.approx(0.1 - 0.392) and ba["loa_high"] == pytest.approx(0.1 + 0.392)


def test_psnr_of_a_known_error():
    truth = np.zeros((8, 8))
    truth[2, 3] = 1.5
    assert metrics.psnr(truth + 0.015, truth) == pytest.approx(40.0)  # 20 log10(1.5 / 0.015)
    assert metrics.psnr(truth + 0.015, truth, data_range=0.15) == pytest.approx(20.0)
    assert metrics.psnr(truth, truth) == np.inf


def test_ssim_identities_and_constant_images():
    rng = np.random.default_rng(2)
    x = rng.random((48, 32))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.ssim(x + 0.3, x) < 1.0
    # Two constant images: variances vanish, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) exactly.
    a, b, peak = 0.8, 0.6, 1.0
    c1 = (0.01 * peak) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim(np.full((20, 20), a), np.full((20, 20), b), data_range=peak) == pytest.approx(expected)
    # Negated structure around the same mean: the structure term is -1 where the contrast is large.
    assert metrics.ssim(2 * x.mean() - x, x, data_range=1.0) < -0.5


def test_ssim_matches_scikit_image_in_wangs_setting():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    truth = np.cumsum(rng.random((64, 40)), axis=0)
    prediction = truth + rng.normal(0, 3, truth.shape)
    ours = metrics.ssim(prediction, truth, data_range=truth.max())
    theirs = skm.structural_similarity(prediction, truth, data_range=truth.max(), gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_roc_auc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    score = y * 0.8 + rng.normal(0, 1, 60)
    u = stats.mannwhitneyu(score[y], score[~y]).statistic
    assert metrics.roc_auc(score, y) == pytest.approx(u / (y.sum() * (~y).sum()))
    assert metrics.roc_auc([1, 1, 1], [0, 1, 0]) == 0.5  # all tied
    assert np.isnan(metrics.roc_auc([0.2, 0.3], [1, 1]))  # one class only


def test_t_score_and_osteoporosis_classification():
    # NHANES III young white women: mean 0.942, SD 0.122 g/cm2; T = -2.5 at 0.637 g/cm2.
    assert metrics.t_score(0.942) == pytest.approx(0.0)
    assert metrics.t_score(0.942 - 0.122) == pytest.approx(-1.0)
    truth = np.array([0.55, 0.60, 0.62, 0.70, 0.80, 0.90, 1.00])  # three osteoporotic (T <= -2.5)
    predicted = np.array([0.58, 0.66, 0.61, 0.63, 0.85, 0.92, 1.01])  # misses one, calls one falsely
    c = metrics.osteoporosis_classification(predicted, truth)
    assert c["n_positive"] == 3
    assert c["sensitivity"] == pytest.approx(2 / 3)
    assert c["specificity"] == pytest.approx(3 / 4)
    assert c["auc"] == pytest.approx(11 / 12)  # of 12 (positive, negative) pairs, one ranked wrongly
    assert "NHANES III" in c["reference"]["population"]


def test_rms_cv_of_known_repeats():
    # Two subjects: CV 2 % and 0 %, one subject with a single value (skipped).
    r = metrics.rms_cv([[1.0, 1.02, 0.98], [0.5, 0.5, 0.5], [0.7]])
    assert r["rms_cv"] == pytest.approx(np.sqrt(0.02 ** 2 / 2))
    assert r["n_subjects"] == 2 and r["n_measurements"] == 6


def test_fit_line_recovers_a_line_and_refuses_a_point():
    x = np.array([0.5, 0.7, 0.9, np.nan])
    assert metrics.fit_line(x, 2 * x + 0.1) == pytest.approx((2.0, 0.1))
    with pytest.raises(ValueError, match="at least 2 distinct x values"):
        metrics.fit_line([0.5, 0.5], [1.0, 2.0])

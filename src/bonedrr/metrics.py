"""Agreement, image and classification metrics of the validation stage (NumPy/SciPy only).

Which variant of each metric is reported, and why:

* **Pearson r** of prediction and ground truth.
* **ICC(2,1)** (Shrout & Fleiss 1979, case 2: two-way random effects, absolute agreement, single
  measurement) is the ICC the validation reports: a BMD method must agree with the reference in value,
  not only in ranking, and ICC(2,1) penalises a systematic offset where ICC(3,1) (consistency) does
  not. :func:`icc` computes both from the same two-way ANOVA.
* **MAE, RMSE**, and the **Bland-Altman** bias (mean of prediction - truth) with 95 % limits of
  agreement (bias +- 1.96 SD of the differences, SD with n - 1).
* **PSNR and SSIM** of a predicted DRR channel against the true one. The data range L is the true
  image's maximum (a DRR channel's minimum is 0 g/cm2, outside the structure): PSNR = 10 log10(L^2 /
  MSE); SSIM after Wang et al. 2004 with an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01,
  K2 = 0.03, averaged over the pixels whose window lies inside the image.
* **ROC AUC** as the Mann-Whitney statistic (ties count one half); **sensitivity and specificity** of
  the rule "osteoporosis if T-score <= -2.5" (WHO).
* **T-scores** of total-hip DXA aBMD against the NHANES III reference of non-Hispanic white women aged
  20-29 (Looker et al., Osteoporos Int 8:468-489, 1998): mean 0.942 g/cm2, SD 0.122 g/cm2. A DRR-BMD
  has no published reference population; it gets a T-score only after its linear calibration to DXA.

Example:
    >>> import numpy as np
    >>> truth = np.array([0.6, 0.7, 0.8, 0.9, 1.0])
    >>> round(agreement(truth + 0.01, truth)["mae"], 6)
    0.01
    >>> round(float(t_score(0.637)), 2)
    -2.5
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: NHANES III total-hip (total femur) reference, non-Hispanic white women aged 20-29 (Looker 1998).
T_SCORE_REFERENCE = {"mean_g_cm2": 0.942, "sd_g_cm2": 0.122,
                     "population": "NHANES III non-Hispanic white women aged 20-29, total hip (Looker et al. 1998)"}
OSTEOPOROSIS_T_SCORE = -2.5


def _pair(prediction, truth) -> tuple[np.ndarray, np.ndarray]:
    """Both as float arrays, keeping only the pairs where both are finite."""
    p, t = np.asarray(prediction, float).ravel(), np.asarray(truth, float).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction and truth differ in length ({p.size} vs {t.size})")
    keep = np.isfinite(p) & np.isfinite(t)
    return p[keep], t[keep]


def pearson(prediction, truth) -> float:
    """Pearson correlation of the finite pairs; NaN with fewer than 3 pairs or no spread."""
    p, t = _pair(prediction, truth)
    if p.size < 3 or p.std() == 0 or t.std() == 0:
        return float("nan")
    pc, tc = p - p.mean(), t - t.mean()
    return float((pc @ tc) / np.sqrt((pc @ pc) * (tc @ tc)))


def icc(ratings) -> dict[str, float]:
    """Intraclass correlations of an (n targets, k raters) table (Shrout & Fleiss 1979).

    Returns:
        ``{"icc_2_1", "icc_3_1", "icc_2_k", "icc_3_k"}``: two-way random (absolute agreement) and
        two-way mixed (consistency), single and average measures. NaN with fewer than 2 targets.

    Example (Shrout & Fleiss's Table 2: 6 targets, 4 judges; their ICC(2,1) = .29, ICC(3,1) = .71):
        >>> x = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
        >>> {k: round(v, 2) for k, v in icc(x).items()}
        {'icc_2_1': 0.29, 'icc_3_1': 0.71, 'icc_2_k': 0.62, 'icc_3_k': 0.91}
    """
    x = np.asarray(ratings, float)
    x = x[np.isfinite(x).all(axis=1)]
    n, k = x.shape
    if n < 2 or k < 2:
        return dict.fromkeys(("icc_2_1", "icc_3_1", "icc_2_k", "icc_3_k"), float("nan"))
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()  # between targets
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()  # between raters (methods)
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    bms, jms, ems = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "icc_2_1": float((bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n)),
            "icc_3_1": float((bms - ems) / (bms + (k - 1) * ems)),
            "icc_2_k": float((bms - ems) / (bms + (jms - ems) / n)),
            "icc_3_k": float((bms - ems) / bms),
        }


def bland_altman(prediction, truth) -> dict[str, float]:
    """Bias (mean of prediction - truth) and 95 % limits of agreement (bias +- 1.96 SD, ddof 1)."""
    p, t = _pair(prediction, truth)
    d = p - t
    bias = float(d.mean()) if d.size else float("nan")
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {"bias": bias, "sd_diff": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def agreement(prediction, truth) -> dict[str, float]:
    """Every agreement metric of a prediction against one ground truth, in the truth's units.

    Returns:
        n, pearson_r, icc_2_1 (reported), icc_3_1, mae, rmse, and the Bland-Altman bias, sd_diff,
        loa_low, loa_high.
    """
    p, t = _pair(prediction, truth)
    d = p - t
    out = {"n": int(p.size), "pearson_r": pearson(p, t)}
    both = icc(np.stack([t, p], axis=1)) if p.size else icc(np.empty((0, 2)))
    out["icc_2_1"], out["icc_3_1"] = both["icc_2_1"], both["icc_3_1"]
    out["mae"] = float(np.abs(d).mean()) if d.size else float("nan")
    out["rmse"] = float(np.sqrt((d ** 2).mean())) if d.size else float("nan")
    out.update(bland_altman(p, t))
    return out


def fit_line(x, y) -> tuple[float, float]:
    """Least-squares ``y = slope * x + intercept`` over the finite pairs (the calibrations)."""
    xs, ys = _pair(x, y)
    if xs.size < 2 or xs.std() == 0:
        raise ValueError(f"a line needs at least 2 distinct x values (got {xs.size} pairs)")
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept)


# ---------------------------------------------------------------------------------------------
# Images


def psnr(prediction: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the truth's maximum.

    Example:
        >>> t = np.zeros((4, 4)); t[0, 0] = 2.0
        >>> round(psnr(t + 0.02, t), 3)  # 10 log10(2^2 / 0.02^2) = 40 dB
        40.0
    """
    prediction, truth = np.asarray(prediction, float), np.asarray(truth, float)
    peak = float(truth.max()) if data_range is None else float(data_range)
    mse = float(((prediction - truth) ** 2).mean())
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(peak ** 2 / mse)) if peak > 0 else float("nan")


def ssim(prediction: np.ndarray, truth: np.ndarray, data_range: float | None = None, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004) of two 2D images with a Gaussian window.

    The window is truncated at 3.5 sigma (11 x 11 for sigma 1.5); local variances are the window's
    weighted population variances, as in Wang's reference code (scikit-image's
    ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``); the mean is taken
    over the pixels whose window lies inside the image. ``data_range`` defaults to the truth's maximum.

    Example:
        >>> x = np.random.default_rng(0).random((32, 32))
        >>> round(ssim(x, x), 6)
        1.0
    """
    x, y = np.asarray(prediction, float), np.asarray(truth, float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"SSIM needs two 2D images of one shape (got {x.shape} and {y.shape})")
    peak = float(y.max()) if data_range is None else float(data_range)
    truncate = 3.5
    radius = int(truncate * sigma + 0.5)
    if min(x.shape) < 2 * radius + 1:
        raise ValueError(f"image {x.shape} is smaller than the SSIM window ({2 * radius + 1})")

    def blur(a):
        return ndimage.gaussian_filter(a, sigma, truncate=truncate, mode="reflect")

    ux, uy = blur(x), blur(y)
    vx, vy = blur(x * x) - ux * ux, blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    c1, c2 = (k1 * peak) ** 2, (k2 * peak) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s[radius:-radius, radius:-radius].mean())


# ---------------------------------------------------------------------------------------------
# Classification


def t_score(abmd_g_cm2, reference: dict = T_SCORE_REFERENCE):
    """T-score of a total-hip aBMD (g/cm2) against ``reference`` (default NHANES III, see module)."""
    return (np.asarray(abmd_g_cm2, float) - reference["mean_g_cm2"]) / reference["sd_g_cm2"]


def roc_auc(score, positive) -> float:
    """Area under the ROC curve of ``score`` (higher = more likely positive), as the Mann-Whitney U
    statistic over (positive, negative) pairs with ties counted one half. NaN without both classes.

    Example:
        >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
        0.75
    """
    s = np.asarray(score, float)
    y = np.asarray(positive, bool)
    keep = np.isfinite(s)
    s, y = s[keep], y[keep]
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def osteoporosis_classification(predicted_abmd, true_abmd, reference: dict = T_SCORE_REFERENCE,
                                threshold: float = OSTEOPOROSIS_T_SCORE) -> dict:
    """Osteoporosis (T-score <= threshold) found from a predicted total-hip aBMD, against DXA's.

    Returns:
        n, n_positive (by the true T-score), auc (of the predicted T-score, lower = positive),
        sensitivity and specificity of the rule on the predicted T-score (NaN where a class is empty),
        the threshold and the reference population.
    """
    p, t = _pair(predicted_abmd, true_abmd)
    tp_true, tp_pred = t_score(t, reference), t_score(p, reference)
    positive, called = tp_true <= threshold, tp_pred <= threshold
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return {
        "n": int(p.size), "n_positive": n_pos,
        "auc": roc_auc(-tp_pred, positive),
        "sensitivity": float((called & positive).sum() / n_pos) if n_pos else float("nan"),
        "specificity": float((~called & ~positive).sum() / n_neg) if n_neg else float("nan"),
        "t_score_threshold": threshold, "reference": dict(reference),
    }


# ---------------------------------------------------------------------------------------------
# Repeatability


def rms_cv(values_by_subject) -> dict[str, float]:
    """Root-mean-square coefficient of variation over subjects measured several times (Gluer et al.
    1995, the precision measure of densitometry): sqrt(mean_j (SD_j / mean_j)^2), SD with ddof 1.

    Args:
        values_by_subject: One sequence of repeated measurements per subject (NaNs dropped; subjects
            with fewer than 2 values are skipped).

    Returns:
        ``{"rms_cv": fraction, "n_subjects": ..., "n_measurements": ...}``.

    Example:
        >>> round(rms_cv([[1.0, 1.02, 0.98], [0.5, 0.5, 0.5]])["rms_cv"], 5)  # sqrt((0.02^2 + 0) / 2)
        0.01414
    """
    cvs, count = [], 0
    for values in values_by_subject:
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        if v.size < 2:
            continue
        cvs.append(v.std(ddof=1) / v.mean())
        count += v.size
    rms = float(np.sqrt(np.mean(np.square(cvs)))) if cvs else float("nan")
    return {"rms_cv": rms, "n_subjects": len(cvs), "n_measurements": count}

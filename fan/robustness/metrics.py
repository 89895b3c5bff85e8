"""ImageNet-C metrics as the literature defines them (Hendrycks & Dietterich, ICLR 2019).

Conventions: every error and accuracy here is a top-1 **percentage** in [0, 100]. A "cell" is one
(corruption, severity) pair; ``errors[corruption][severity]`` is the model's top-1 error on that cell.

* CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}. Only the AlexNet mean over the five severities is published,
  so CE_c = mean_s(E_{s,c}) / mean-AlexNet-error_c; it needs all five severities.
* mCE = mean of CE_c over the 15 standard corruptions (the 4 extras have no AlexNet constant); AlexNet = 100.
* relative CE_c = sum_s (E_{s,c} - E_clean) / (5 * (mean-AlexNet-error_c - AlexNet clean error)); relative mCE
  is its mean over the 15.
* Another dataset normalises by a model of its own instead of AlexNet (``reference_errors``: Fashion-MNIST-C by a
  ConvNet): CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}, and the relative CE with the reference's clean error.
* mean accuracy = mean top-1 accuracy over every evaluated cell (FAN's "IN-C" number; which corruptions went in
  decides its value), retention = mean accuracy / clean accuracy.
"""
from typing import Dict, List, Mapping, Optional
from ..errors import UserError

__all__ = [
    'STANDARD_CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'ALL_CORRUPTIONS', 'SEVERITIES',
    'ALEXNET_ERROR', 'ALEXNET_CLEAN_ERROR', 'summarize_corruption_errors',
]

STANDARD_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
ALL_CORRUPTIONS = STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet top-1 error (percent), mean over severities 1-5, from hendrycks/robustness (the same values are in
# google-research/augmix and NVlabs/FAN).
ALEXNET_ERROR: Dict[str, float] = {
    'gaussian_noise': 88.6428, 'shot_noise': 89.4468, 'impulse_noise': 92.2640,
    'defocus_blur': 81.9880, 'glass_blur': 82.6268, 'motion_blur': 78.5948, 'zoom_blur': 79.8360,
    'snow': 86.6816, 'frost': 82.6572, 'fog': 81.9324, 'brightness': 56.4592,
    'contrast': 85.3204, 'elastic_transform': 64.6056, 'pixelate': 71.7840, 'jpeg_compression': 60.6500,
}
# torchvision AlexNet_Weights.IMAGENET1K_V1: acc@1 56.522.
ALEXNET_CLEAN_ERROR = 100.0 - 56.522


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def summarize_corruption_errors(
        errors: Mapping[str, Mapping[int, float]],
        clean_error: Optional[float] = None,
        reference_errors: Optional[Mapping[str, Mapping[int, float]]] = None,
        reference_clean_error: Optional[float] = None,
) -> Dict:
    """Aggregate per-cell top-1 errors into CE, mCE, relative mCE, mean accuracy and retention.

    Args:
        errors: top-1 error in percent per corruption name, per severity (1-5); only evaluated cells.
        clean_error: top-1 error in percent on the clean images, if they were evaluated.
        reference_errors: the normalising model's errors in the same form, instead of AlexNet's published ones
            (another dataset: Fashion-MNIST-C normalised by a ConvNet); CE_c = sum_s E_s / sum_s E_s(reference).
        reference_clean_error: the normalising model's clean error, for the relative CE with ``reference_errors``.

    Returns:
        A dict with ``ce`` and ``relative_ce`` ({corruption: percent}, standard corruptions with all five
        severities only), ``mce``, ``relative_mce``, ``mean_accuracy`` (all evaluated cells),
        ``mean_accuracy_standard`` (the 75 standard cells), ``retention`` (percent), ``corruption_set``
        (which cells ``mean_accuracy`` covers) and ``incomplete`` ({aggregate: why it is missing or partial}).
        An aggregate that cannot be computed exactly as defined is None, never an approximation.
    """
    unknown = sorted(set(errors) - set(ALL_CORRUPTIONS))
    if unknown:
        raise UserError(f'unknown corruption(s) {unknown}; known: {list(ALL_CORRUPTIONS)}')
    incomplete: Dict[str, str] = {}
    complete = [c for c in ALL_CORRUPTIONS if c in errors and set(errors[c]) == set(SEVERITIES)]

    if reference_errors is None:
        reference_mean, reference_clean = ALEXNET_ERROR, ALEXNET_CLEAN_ERROR
    else:
        reference_mean = {c: _mean([reference_errors[c][s] for s in SEVERITIES]) for c in reference_errors
                          if set(reference_errors[c]) == set(SEVERITIES)}
        reference_clean = reference_clean_error
        complete = [c for c in complete if c in reference_mean]
    ce, relative_ce = {}, {}
    for corruption in STANDARD_CORRUPTIONS:
        if corruption not in complete:
            continue
        mean_error = _mean([errors[corruption][s] for s in SEVERITIES])
        if reference_mean[corruption] > 0:  # (a reference model may make no error on a corruption)
            ce[corruption] = 100.0 * mean_error / reference_mean[corruption]
        if clean_error is not None and reference_clean is not None and reference_mean[corruption] != reference_clean:
            relative_ce[corruption] = 100.0 * (mean_error - clean_error) / (
                reference_mean[corruption] - reference_clean)

    missing_standard = [c for c in STANDARD_CORRUPTIONS if c not in complete]
    mce = relative_mce = None
    if missing_standard:
        incomplete['mce'] = 'needs all 5 severities of the 15 standard corruptions; missing or partial: ' + \
            ', '.join(missing_standard)
        incomplete['relative_mce'] = incomplete['mce']
    else:
        if len(ce) < len(STANDARD_CORRUPTIONS):
            incomplete['mce'] = 'the reference model makes no error on: ' + ', '.join(
                c for c in STANDARD_CORRUPTIONS if c not in ce)
        else:
            mce = _mean(list(ce.values()))
        if clean_error is None or reference_clean is None:
            incomplete['relative_mce'] = 'needs the clean error (--clean DIR)'
        elif len(relative_ce) < len(STANDARD_CORRUPTIONS):
            incomplete['relative_mce'] = 'the reference model loses no accuracy to: ' + ', '.join(
                c for c in STANDARD_CORRUPTIONS if c not in relative_ce)
        else:
            relative_mce = _mean(list(relative_ce.values()))

    cell_accuracies = [100.0 - e for c in errors for e in errors[c].values()]
    mean_accuracy = _mean(cell_accuracies) if cell_accuracies else None
    mean_accuracy_standard = None
    if not missing_standard:
        mean_accuracy_standard = _mean([100.0 - errors[c][s] for c in STANDARD_CORRUPTIONS for s in SEVERITIES])
    n_cells = len(cell_accuracies)
    if len(complete) == len(ALL_CORRUPTIONS) and n_cells == 19 * 5:
        corruption_set = 'all 19 corruptions x 5 severities'
    elif not missing_standard and n_cells == 15 * 5:
        corruption_set = '15 standard corruptions x 5 severities'
    else:
        corruption_set = f'subset: {n_cells} cells over {len(errors)} corruption(s)'
        incomplete['mean_accuracy'] = f'covers only {n_cells} cells; the literature averages 75 (15 standard ' \
            'corruptions) or 95 (all 19)'

    retention = clean_accuracy = None
    if clean_error is None:
        incomplete['retention'] = 'needs the clean error (--clean DIR)'
    else:
        clean_accuracy = 100.0 - clean_error
        if clean_accuracy == 0:
            incomplete['retention'] = 'undefined: clean accuracy is 0'
        elif mean_accuracy is not None:
            retention = 100.0 * mean_accuracy / clean_accuracy

    return dict(
        ce=ce,
        relative_ce=relative_ce,
        mce=mce,
        relative_mce=relative_mce,
        mean_accuracy=mean_accuracy,
        mean_accuracy_standard=mean_accuracy_standard,
        clean_accuracy=clean_accuracy,
        retention=retention,
        corruption_set=corruption_set,
        incomplete=incomplete,
    )

"""Robustness evaluation: ImageNet-C (mCE, relative mCE, mean accuracy, retention), ImageNet-A/R, make-c."""
from .driver import DATASETS, run_classification, run_imagenet_c
from .corrupt import corrupt_image, make_imagenet_c
from .evaluate import ModelSpec
from .metrics import (ALEXNET_CLEAN_ERROR, ALEXNET_ERROR, ALL_CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES,
                      STANDARD_CORRUPTIONS, summarize_corruption_errors)

"""Run timm's own ``tests/test_models.py`` on the FAN models only.

While timm's test module is imported (its parametrisations call ``timm.list_models`` at import time),
``list_models`` returns FAN models only, and the FAN models with token outputs join timm's non-standard family
wherever timm names ``xcit_*``; our model modules join timm's list of modules with ``forward_intermediates``.
Tests that do not run on a FAN model (timm's checks of specific timm models) are deselected, and so are the
tests that download pretrained weights (no test fetches weights), and timm's feature tests, which want at least 3
feature levels, on the two micro models that have two.

Time budget: every test runs on every model of up to 30 M parameters (the tiny and small variant of each family);
the bigger models (same code, more or wider blocks) get the forward, config and feature tests, while the slow
backward / TorchScript / FX / pruning-contract tests run on them only with ``FAN_PEER_ALL=1`` (pruning a two-width
model is also tested on a small config in tests/test_dense.py).
"""
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, List, Union
from unittest import mock

import pytest
import timm
import timm.models._registry as registry

import fan  # noqa: F401  (registers the models)
from fan.registry import FAMILIES, fan_model_modules, fan_models
from fan.zoo import count_params

FAN_MODULES = fan_model_modules()
FAN_TOKEN_MODELS = [p for f in FAMILIES if f.token_outputs for p in f.patterns]  # token outputs, like xcit_*
_list_models = registry.list_models
FAN_MODELS = set(fan_models())
DOWNLOADING_TESTS = ('test_model_load_pretrained', 'test_model_features_pretrained')
SLOW_TESTS = ('test_model_backward', 'test_model_forward_torchscript', 'test_model_forward_fx',
              'test_model_backward_fx', 'test_model_forward_fx_torchscript',
              'test_prune_intermediate_layers_contract')  # 10-35 s per big model on 2 cores
SMALL_PARAMS = 30e6
# timm's feature tests assert at least 3 feature levels ("all models here should have at least 3"); the two-block
# micro FAN-ViT and the two-stage micro FAN-Swin for 28-32 px images have two (tests/test_fan_models.py checks their
# feature maps and intermediates)
FEATURE_LEVEL_TESTS = ('test_model_forward_features', 'test_model_forward_intermediates')
TWO_LEVEL_MODELS = ('fan_micro_2_p4_28', 'fan_swin_micro_patch4_window4_32')


@lru_cache(maxsize=None)
def _is_small(name: str) -> bool:
    return count_params(name) <= SMALL_PARAMS


def _as_list(value: Union[str, List[str]]) -> List[str]:
    return [value] if isinstance(value, str) and value else list(value or [])


def fan_list_models(filter='', module='', pretrained=False, exclude_filters='', name_matches_cfg=False,
                    include_tags=None) -> List[str]:
    filters, exclude, modules = _as_list(filter), _as_list(exclude_filters), _as_list(module)
    if 'xcit_*' in filters:
        filters += FAN_TOKEN_MODELS
    if 'xcit_*' in exclude:
        exclude += FAN_TOKEN_MODELS
    if 'xcit' in modules:
        modules += FAN_MODULES
    names = _list_models(filters or '', modules or '', pretrained, exclude or '', name_matches_cfg, include_tags)
    return [n for n in names if n.split('.')[0] in FAN_MODELS]


@contextmanager
def fan_models_only() -> Iterator[None]:
    with mock.patch.object(registry, 'list_models', fan_list_models), \
            mock.patch.object(timm, 'list_models', fan_list_models), \
            mock.patch.object(timm.models, 'list_models', fan_list_models):
        yield


class PeerModule(pytest.Module):
    def _getobj(self):
        with fan_models_only():
            return super()._getobj()


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name == 'test_models.py':
        return PeerModule.from_parent(parent, path=module_path)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    run_all = bool(os.environ.get('FAN_PEER_ALL'))
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, 'callspec', None)
        model = str(callspec.params.get('model_name', '')).split('.')[0] if callspec is not None else ''
        is_peer = item.path.name == 'test_models.py' and item.path.parent.name == '_timm'
        wanted = (model in FAN_MODELS and item.originalname not in DOWNLOADING_TESTS
                  and (run_all or item.originalname not in SLOW_TESTS or _is_small(model))
                  and not (item.originalname in FEATURE_LEVEL_TESTS and model in TWO_LEVEL_MODELS))
        (drop if is_peer and not wanted else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep

"""The study's best FAN runs as shippable weights: float16 safetensors of a few MB with a record of how they were
trained and what they score, measured the way users will load them (``fan eval --dataset torch/fashion_mnist`` on a
checkpoint file: timm's data config, the 10,000 test images).

The package ships them in ``fan/weights/`` (``fan.models._checkpoint.PACKAGE_WEIGHTS``) as the ``fashion_mnist``
pretrained tag of each FAN micro model (copy ``OUT/weights/*`` there), so
``timm.create_model('fan_micro_2_p4_28.fashion_mnist', pretrained=True)`` loads offline.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..io import write_json
from ..models._checkpoint import FASHION_MNIST_TAG as TAG
from .training import Recipe, StudyModel, run_name

__all__ = ['export_best_weights']


def export_best_weights(out: Path, specs: Sequence[StudyModel], seeds: Sequence[int], recipe: Recipe,
                        command: str, data: Optional[str] = None) -> List[Dict[str, Any]]:
    """For each FAN model, its best seed's final weights as ``OUT/weights/<arch>.fashion_mnist.safetensors``
    (float16) and ``.json`` (seed, recipe, command, training minutes, the test top-1 after each epoch, and the test
    top-1 of those float16 weights)."""
    from safetensors.torch import save_file

    from ..robustness.driver import FASHION_MNIST, run_classification
    from ..robustness.evaluate import ModelSpec

    records = []
    for spec in (s for s in specs if s.is_fan):
        histories = {seed: json.loads((out / 'runs' / run_name(spec, seed) / 'history.json').read_text())
                     for seed in seeds}
        best = max(seeds, key=lambda seed: histories[seed]['epochs'][-1]['test_top1'])
        state = torch.load(out / 'runs' / run_name(spec, best) / 'weights.pth', map_location='cpu', weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        path = out / 'weights' / f'{spec.arch}.{TAG}.safetensors'
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f'.{path.name}.tmp')
        save_file({k: v.contiguous() for k, v in half.items()}, str(temporary),
                  metadata={'arch': spec.arch, 'dataset': 'Fashion-MNIST', 'seed': str(best)})
        temporary.replace(path)
        measured = run_classification(ModelSpec(spec.arch, checkpoint=path), FASHION_MNIST, data, workers=0,
                                      device='cpu')
        record = {
            'model': f'{spec.arch}.{TAG}', 'file': path.name, 'dtype': 'float16', 'dataset': 'Fashion-MNIST',
            'test_top1': round(measured['top1'] / 100, 4), 'test_images': measured['images'],
            'measured_with': f'fan eval --dataset {FASHION_MNIST} --model {spec.arch}.{TAG} --pretrained',
            'seed': best, 'seeds': list(seeds),
            'seed_top1': {str(s): round(histories[s]['epochs'][-1]['test_top1'], 4) for s in seeds},
            'epoch_top1': [round(epoch['test_top1'], 4) for epoch in histories[best]['epochs']],  # float32 weights
            'train_minutes': round(histories[best]['epochs'][-1]['train_seconds'] / 60, 1),
            'recipe': recipe.__dict__, 'command': command,
        }
        write_json(path.with_suffix('.json'), record)
        records.append(record)
    return records

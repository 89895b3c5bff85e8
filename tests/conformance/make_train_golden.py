"""Train-mode golden data from the official implementation (how ``train/*.json`` were made; not run by the tests).

    OFFICIAL_FAN_DIR=/path/to/NVlabs-FAN python make_train_golden.py OUT_DIR [models]

Runs the official code from the checkout it is given (its ``models/`` registers the FAN models with timm 0.5.4;
nothing of it is copied here), with the conformance weights of ``recipe.py``, stochastic depth off, in training
mode (BatchNorm on batch statistics) on the conformance input, and records for ``loss = sum(logits * R)``
(``R = golden_input((2, 1000), seed=1)``): the logits, the input gradient projected on eight seeded random
directions, and the norm of every parameter gradient under its official name.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import recipe  # noqa: E402

MODELS = ['fan_tiny_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_swin_tiny_patch4_window7_224']
PROJECTIONS = 8


def input_gradient_projections(grad: torch.Tensor) -> list:
    return [float((grad * recipe.golden_input(grad.shape, seed=100 + i)).sum()) for i in range(PROJECTIONS)]


def main() -> None:
    out_dir = Path(sys.argv[1])
    models = sys.argv[2:] or MODELS
    sys.path.insert(0, os.environ['OFFICIAL_FAN_DIR'])
    import models as official  # noqa: F401  (registers the official FAN models)
    import timm
    out_dir.mkdir(parents=True, exist_ok=True)
    conformance = Path(__file__).parent
    for name in models:
        data = json.loads((conformance / f'{name}.json').read_text())
        model = timm.create_model(name, drop_path_rate=0.)
        missing, unexpected = model.load_state_dict(recipe.official_state_dict(data['keys']), strict=False)
        assert not unexpected and all(k.endswith(('relative_position_index', 'attn_mask')) for k in missing)
        model.train()
        x = recipe.golden_input(data['input']['shape'], data['input']['seed']).requires_grad_()
        logits = model(x)
        (logits * recipe.golden_input(logits.shape, seed=1)).sum().backward()
        result = {
            'model': name,
            'input': data['input'],
            'logits': logits.tolist(),
            'input_grad_projections': input_gradient_projections(x.grad),
            'grad_norms': {k: float(p.grad.norm()) for k, p in model.named_parameters() if p.grad is not None},
        }
        (out_dir / f'{name}.json').write_text(json.dumps(result))
        print(name, 'ok')


if __name__ == '__main__':
    main()

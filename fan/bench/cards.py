"""Model cards: one JSON file per registered FAN model (``models/<name>.json``), and the README zoo table.

A card holds the architecture (read from the built model), the parameter count and fvcore GMACs at the default
input size, one entry per released set of weights (pretrained tag, checkpoint file, URL, licence, input size,
classes, parameters, GMACs), and the published results with their source. Cards are generated from the code and
:mod:`fan.bench.published` (``fan cards --write``) and checked against the code (``fan cards --check``, and the
test suite); the README table is generated from the cards (``fan cards --readme``).
"""
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn

from ..models.fan import Fan, HybridEmbed
from ..models.fan_swin import FanSwin
from ..models._checkpoint import packaged_weights_record
from ..factory import create_model
from ..registry import FAMILIES, fan_models
from ..zoo import zoo
from .flops import count_gmacs, count_params
from .published import fan_results
from ..errors import MissingPathError, UserError
from ..io import write_atomic, write_json

__all__ = [
    'ZOO_START', 'ZOO_END', 'fan_model_names', 'describe_architecture', 'build_card', 'load_cards', 'write_cards',
    'card_differences', 'zoo_table', 'update_readme',
]

ZOO_START, ZOO_END = '<!-- zoo:start -->', '<!-- zoo:end -->'
_GMACS_NOTE = 'fvcore multiply-adds per image (G) at input_size, attention matmuls counted (fused attention off)'
_GMACS_TOLERANCE = 5e-4  # G: cards store 4 decimals


def fan_model_names() -> List[str]:
    """Every registered FAN model (untagged names)."""
    return fan_models()


def describe_architecture(model: nn.Module) -> Dict[str, Any]:
    """The architecture of a built FAN model as plain data: stem, then per stage depth, width, heads and MLP."""
    if isinstance(model, FanSwin):
        stages = [_stage(stage.blocks, stage.blocks[0].dim, window_size=stage.blocks[0].window_size[0])
                  for stage in model.layers]
        return {'class': 'FanSwin', 'stem': {'type': 'patch', 'patch_size': model.patch_embed.patch_size[0]},
                'stages': stages}
    if isinstance(model, Fan):
        if isinstance(model.patch_embed, HybridEmbed):
            backbone = model.patch_embed.backbone
            stem = {'type': 'convnext', 'depths': [len(s.blocks) for s in backbone.stages],
                    'dims': [info['num_chs'] for info in backbone.feature_info]}
        else:
            stem = {'type': 'conv', 'patch_size': model.patch_size}
        stages, start = [], 0
        widths = [block.attn.num_heads * block.attn.head_dim for block in model.blocks]
        for i in range(1, len(widths) + 1):  # a stage: consecutive blocks of one width
            if i == len(widths) or widths[i] != widths[start]:
                stages.append(_stage(model.blocks[start:i], widths[start]))
                start = i
        return {'class': 'Fan', 'stem': stem, 'stages': stages,
                'class_attention_blocks': len(model.cls_attn_blocks)}
    raise TypeError(f'no card layout for {type(model).__name__}: cards describe the FAN models')


def _stage(blocks: Sequence[nn.Module], dim: int, **extra: Any) -> Dict[str, Any]:
    mlps = sorted({type(block.mlp).__name__ for block in blocks})
    return {'depth': len(blocks), 'dim': dim, 'num_heads': blocks[0].attn.num_heads, **extra, 'mlp': '+'.join(mlps)}


def _trained_here(cfg) -> Dict[str, Any]:
    """For weights this project trained and ships (a ``file`` in the package): ``trained``, how they were trained
    and their measured accuracy (the record beside the file)."""
    if not cfg.file:
        return {}
    return {'trained': packaged_weights_record(Path(cfg.file))}


def _published(name: str) -> List[Dict[str, Any]]:
    """The published results of ``name`` as card entries (without the model name)."""
    return [{k: v for k, v in asdict(r).items() if k != 'model'} for r in fan_results(name)]


def _meta_model(name: str, **kwargs: Any) -> nn.Module:
    with torch.device('meta'):  # structure only: no memory, no init
        return create_model(name, **kwargs)


def build_card(name: str) -> Dict[str, Any]:
    """The card of the registered FAN model ``name``, computed from the code (fvcore runs: seconds to a minute)."""
    entry = next((e for e in zoo(name) if e.name == name), None)
    if entry is None:
        raise UserError(f'unknown FAN model {name!r}; `fan list` shows the registered ones')
    model = _meta_model(name)
    cfg = model.pretrained_cfg
    input_size = tuple(cfg['input_size'])
    gmacs = count_gmacs(name, input_size)
    weights = []
    for tag in entry.weights:
        tag_cfg = timm.get_pretrained_cfg(f'{name}.{tag}')
        tag_size = tuple(tag_cfg.input_size)
        same_shape = tag_size == input_size and tag_cfg.num_classes == cfg['num_classes']
        weights.append({
            'tag': tag,
            'checkpoint': (tag_cfg.url or tag_cfg.file).rsplit('/', 1)[-1],
            'url': tag_cfg.url,
            'license': tag_cfg.license,
            'input_size': list(tag_size),
            'num_classes': tag_cfg.num_classes,
            'param_count': entry.params if same_shape else count_params(_meta_model(f'{name}.{tag}')),
            'gmacs': round(gmacs if same_shape else count_gmacs(f'{name}.{tag}', tag_size), 4),
            **_trained_here(tag_cfg),
        })
    return {
        'model': name,
        'family': entry.family,
        'paper': cfg.get('paper_ids'),
        'official_code': cfg.get('origin_url'),
        'architecture': describe_architecture(model),
        'input_size': list(input_size),
        'num_classes': cfg['num_classes'],
        'param_count': entry.params,
        'gmacs': round(gmacs, 4),
        'gmacs_note': _GMACS_NOTE,
        'weights': weights,
        'published': _published(name),
    }


def load_cards(card_dir: Path) -> Dict[str, Dict[str, Any]]:
    """Every card in ``card_dir``, by model name."""
    if not card_dir.is_dir():
        raise MissingPathError(f'no card folder {card_dir}')
    cards = {}
    for path in sorted(card_dir.glob('*.json')):
        card = json.loads(path.read_text())
        if card.get('model') != path.stem:
            raise UserError(f'{path} describes {card.get("model")!r}, not {path.stem!r}')
        cards[path.stem] = card
    return cards


def write_cards(card_dir: Path, names: Optional[Sequence[str]] = None) -> List[Path]:
    """(Re)generate the cards of ``names`` (default: every registered FAN model) in ``card_dir``."""
    card_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or fan_model_names():
        path = card_dir / f'{name}.json'
        write_json(path, build_card(name))
        paths.append(path)
    return paths


def card_differences(card: Dict[str, Any], count_flops: bool = True) -> List[str]:
    """How ``card`` disagrees with the code (empty: it agrees): architecture, parameters, weights entries,
    published results and, with ``count_flops``, GMACs (fvcore; without it GMACs are not checked)."""
    name = card['model']
    if not timm.is_model(name):
        return [f'{name}: not a registered model']
    model = _meta_model(name)
    expected = {
        'architecture': describe_architecture(model),
        'input_size': list(model.pretrained_cfg['input_size']),
        'num_classes': model.num_classes,
        'param_count': count_params(model),
        'published': _published(name),
    }
    problems = [f'{name}: {key} is {card.get(key)!r} in the card, {value!r} in the code'
                for key, value in expected.items() if card.get(key) != value]
    card_tags = [w['tag'] for w in card['weights']]
    registered_tags = [n.split('.', 1)[1] for n in timm.list_pretrained(f'{name}.*')]
    if card_tags != registered_tags:
        problems.append(f'{name}: the card lists weights {card_tags}, the code registers {registered_tags}')
    for w in card['weights']:
        if w['tag'] not in registered_tags:
            continue
        cfg = timm.get_pretrained_cfg(f'{name}.{w["tag"]}')
        params = expected['param_count'] if cfg.num_classes == model.num_classes else count_params(
            _meta_model(f'{name}.{w["tag"]}'))
        code = {'url': cfg.url, 'license': cfg.license, 'input_size': list(cfg.input_size),
                'num_classes': cfg.num_classes, 'param_count': params, **_trained_here(cfg)}
        problems += [f'{name}.{w["tag"]}: {k} is {w.get(k)!r} in the card, {v!r} in the code'
                     for k, v in code.items() if w.get(k) != v]
    if count_flops:
        checks = [(name, card['input_size'], card['gmacs'])]
        checks += [(f'{name}.{w["tag"]}', w['input_size'], w['gmacs']) for w in card['weights']
                   if (w['input_size'], w['num_classes']) != (card['input_size'], card['num_classes'])]
        for variant, size, value in checks:
            counted = count_gmacs(variant, tuple(size))
            if abs(counted - value) > _GMACS_TOLERANCE:
                problems.append(f'{variant}: gmacs is {value} in the card, {counted:.4f} in the code')
    return problems


def zoo_table(cards: Dict[str, Dict[str, Any]]) -> str:
    """The README zoo table (Markdown): one row per released set of weights, and one per published result or
    model without released weights; followed by the licences of the weights."""
    header = ('| model | family | input | params (M) | GMACs | IN-1K | IN-C | IN-A | IN-R | checkpoint |\n'
              '|---|---|---|---|---|---|---|---|---|---|')
    lines, licenses = [header], set()
    for card in sorted(cards.values(), key=lambda c: ([f.name for f in FAMILIES].index(c['family']), c['param_count'])):
        name, results = card['model'], {r['tag']: r for r in card['published']}
        for w in card['weights']:
            licenses.add(w['license'])
            checkpoint = f'[{w["checkpoint"]}]({w["url"]})' if w['url'] else \
                f'in the package ({w["trained"]["dataset"]} top-1 {w["trained"]["test_top1"]:.4f}, measured here)'
            lines.append(_zoo_row(f'`{name}.{w["tag"]}`', card['family'], w, results.get(w['tag']), checkpoint))
        if None in results or not card['weights']:
            label = f'`{name}`' + (f' ({results[None]["training_data"]})' if None in results else '')
            lines.append(_zoo_row(label, card['family'], card, results.get(None), 'not released'))
    notes = [
        '',
        'GMACs: fvcore multiply-adds per image at the input size, attention included (what FAN calls GFLOPs and '
        'timm `gmacs`). IN-C: mean top-1 accuracy over the ImageNet-C corruptions (higher is better, not mCE). '
        'ImageNet accuracies are the authors\' published numbers (source in each card), not measured here; the '
        'Fashion-MNIST weights were trained and measured by this project (`fan study fashion-mnist`).',
        f'Weights licence: {", ".join(sorted(lic for lic in licenses if lic))}.',
    ]
    return '\n'.join(lines + notes)


def _zoo_row(label: str, family: str, sized: Dict[str, Any], result: Optional[Dict[str, Any]], checkpoint: str) -> str:
    """A table row; ``sized`` is a card or a weights entry (``input_size``, ``param_count``, ``gmacs``)."""
    accuracies = [result.get(k) if result else None for k in ('imagenet_1k', 'imagenet_c', 'imagenet_a', 'imagenet_r')]
    cells = [label, family, str(sized['input_size'][-1]), f'{sized["param_count"] / 1e6:.2f}', f'{sized["gmacs"]:.2f}',
             *('-' if v is None else f'{v:.1f}' for v in accuracies), checkpoint]
    return '| ' + ' | '.join(cells) + ' |'


def update_readme(readme: Path, cards: Dict[str, Dict[str, Any]]) -> bool:
    """Replace the text between the zoo markers of ``readme`` with :func:`zoo_table`; True when it changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(ZOO_START) + r'.*?' + re.escape(ZOO_END), re.S)
    if not pattern.search(text):
        raise UserError(f'{readme} has no {ZOO_START} ... {ZOO_END} block')
    new = pattern.sub(lambda _: f'{ZOO_START}\n{zoo_table(cards)}\n{ZOO_END}', text)
    write_atomic(readme, new)
    return new != text

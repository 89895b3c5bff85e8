"""Model cards (models/*.json): one per registered FAN model, in agreement with the code, the official GMACs and
the README zoo table.

fvcore on all 17 models and 5 extra weights variants takes minutes on a 2-core CPU, so the suite recounts GMACs for
a representative subset (the small ViT, Hybrid and Swin models); parameters, architecture, weights entries and
published results are checked for every card, and ``fan cards --check`` recounts every GMACs figure.
"""
import copy
from pathlib import Path

import pytest
import torch
import timm

from fan.bench.cards import (
    ZOO_END, ZOO_START, card_differences, describe_architecture, fan_model_names, load_cards, update_readme,
    zoo_table,
)
from fan.bench.flops import count_gmacs

ROOT = Path(__file__).resolve().parents[1]
CARDS = load_cards(ROOT / 'models')

# fvcore GMACs of the official implementation at 224 (NVlabs/FAN models, counted with attention; the table)
OFFICIAL_GMACS_224 = {
    'fan_tiny_12_p16_224': 1.49, 'fan_small_12_p16_224': 5.49, 'fan_base_18_p16_224': 10.70,
    'fan_large_24_p16_224': 16.02,
    'fan_tiny_8_p4_hybrid': 3.65, 'fan_small_12_p4_hybrid': 7.01, 'fan_base_16_p4_hybrid': 11.81,
    'fan_large_16_p4_hybrid': 17.74, 'fan_xlarge_16_p4_hybrid': 21.15,
    'fan_swin_tiny_patch4_window7_224': 4.92, 'fan_swin_small_patch4_window7_224': 9.60,
    'fan_swin_base_patch4_window7_224': 16.86, 'fan_swin_large_patch4_window7_224': 37.47,
}
OFFICIAL_GMACS_384 = {'fan_base_16_p4_hybrid': 37.83, 'fan_large_16_p4_hybrid': 56.74}
RECOUNTED = ('fan_tiny_12_p16_224', 'fan_small_12_p16_224', 'fan_tiny_8_p4_hybrid', 'fan_small_12_p4_hybrid',
             'fan_swin_tiny_patch4_window7_224')


def test_every_registered_model_has_a_card():
    assert sorted(CARDS) == sorted(fan_model_names())
    assert len(CARDS) == 17


@pytest.mark.parametrize('name', sorted(CARDS))
def test_card_agrees_with_the_code(name):
    assert card_differences(CARDS[name], count_flops=False) == []


@pytest.mark.parametrize('name', RECOUNTED)
def test_card_gmacs_equal_a_fresh_fvcore_count(name):
    card = CARDS[name]
    assert count_gmacs(name, tuple(card['input_size'])) == pytest.approx(card['gmacs'], abs=5e-4)


def test_gmacs_agree_with_the_official_implementation_within_1_percent():
    for name, official in OFFICIAL_GMACS_224.items():
        assert CARDS[name]['input_size'][-1] == 224
        assert CARDS[name]['gmacs'] == pytest.approx(official, rel=0.01), name
    for name, official in OFFICIAL_GMACS_384.items():
        (weights,) = [w for w in CARDS[name]['weights'] if w['input_size'][-1] == 384]
        assert weights['gmacs'] == pytest.approx(official, rel=0.01), name


def test_architecture_matches_the_published_configs():
    with torch.device('meta'):
        xlarge = describe_architecture(timm.create_model('fan_xlarge_16_p4_hybrid'))
        small_hybrid = describe_architecture(timm.create_model('fan_small_12_p4_hybrid'))
        swin_base = describe_architecture(timm.create_model('fan_swin_base_patch4_window7_224'))
    assert xlarge['stem'] == {'type': 'convnext', 'depths': [3, 7], 'dims': [128, 256]}
    assert [(s['depth'], s['dim'], s['num_heads']) for s in xlarge['stages']] == [(20, 528, 11), (3, 768, 16)]
    assert [(s['depth'], s['dim']) for s in small_hybrid['stages']] == [(10, 384)]  # "12" in the name, 10 blocks
    assert [(s['depth'], s['dim'], s['num_heads'], s['mlp']) for s in swin_base['stages']] == [
        (2, 128, 4, 'ChannelAttention'), (2, 256, 8, 'ChannelAttention'), (18, 512, 16, 'ChannelAttention'),
        (2, 1024, 32, 'Mlp')]


def test_published_results_reach_the_cards():
    tiny = CARDS['fan_tiny_12_p16_224']
    assert tiny['weights'][0]['checkpoint'] == 'fan_vit_tiny.pth.tar'
    assert tiny['published'][0]['tag'] == 'nv_in1k'
    assert [tiny['published'][0][k] for k in ('imagenet_1k', 'imagenet_c', 'imagenet_a', 'imagenet_r')] == [
        79.2, 57.5, 15.6, 42.5]
    assert CARDS['fan_swin_tiny_patch4_window7_224']['published'] == []  # no FAN-Swin results were published


def test_card_differences_notice_a_wrong_card():
    card = copy.deepcopy(CARDS['fan_tiny_8_p4_hybrid'])
    card['param_count'] += 1
    card['architecture']['stages'][0]['depth'] = 12
    card['weights'][0]['url'] = 'https://example.com/other.pth'
    card['gmacs'] = 3.0
    problems = card_differences(card)
    assert len(problems) == 4
    assert any('param_count' in p for p in problems) and any('architecture' in p for p in problems)
    assert any('url' in p for p in problems) and any('gmacs' in p for p in problems)
    card['weights'] = []
    assert any("registers ['nv_in1k']" in p for p in card_differences(card, count_flops=False))


def test_readme_zoo_table_is_generated_from_the_cards(tmp_path):
    readme = (ROOT / 'README.md').read_text()
    block = readme.split(ZOO_START, 1)[1].split(ZOO_END, 1)[0]
    assert block.strip() == zoo_table(CARDS).strip(), 'README zoo table is stale: run `fan cards --readme`'
    table = zoo_table(CARDS)
    assert '| `fan_tiny_12_p16_224.nv_in1k` | FAN-ViT | 224 | 7.32 | 1.49 | 79.2 | 57.5 | 15.6 | 42.5 |' in table
    assert '| `fan_large_16_p4_hybrid` (ImageNet-1K) |' in table

    copy_readme = tmp_path / 'README.md'
    copy_readme.write_text(f'intro\n{ZOO_START}\nold table\n{ZOO_END}\nrest\n')
    assert update_readme(copy_readme, CARDS)
    assert copy_readme.read_text() == f'intro\n{ZOO_START}\n{table}\n{ZOO_END}\nrest\n'
    assert not update_readme(copy_readme, CARDS)
    copy_readme.write_text('no markers\n')
    with pytest.raises(ValueError, match='no <!-- zoo:start -->'):
        update_readme(copy_readme, CARDS)

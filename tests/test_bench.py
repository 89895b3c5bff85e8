"""fan.bench: timing, FLOP counting, child-process memory peaks, the benchmark runner and the FAN/peer ratios."""
import argparse
import csv
import json
import statistics
import time
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn as nn

from fan.bench import cli as bench_cli
from fan.cli import main
from fan.errors import UserError
from fan.bench.child import ChildError, run_in_child
from fan.bench.flops import count_gmacs, count_params, fvcore_gmacs
from fan.bench.measure import BenchSettings, resolve_input_size
from fan.bench.memory import PeakMemory
from fan.bench.peers import compare_with_peers, pair_ratios
from fan.bench.published import published_top1
from fan.bench.runner import CSV_COLUMNS, format_table, resolve_models, run_benchmark
from fan.bench.throughput import time_interleaved, time_steps


def _allocate_and_measure(mib: int) -> float:
    """In a child: the peak-memory growth while a float32 tensor of ``mib`` MiB exists."""
    memory = PeakMemory(torch.device('cpu'))
    block = torch.ones(mib * 2 ** 18)  # written, so resident
    del block
    return memory.peak_mib()


def test_time_steps_times_only_the_steps_after_warmup(monkeypatch):
    clock = [0.0]  # a fake perf_counter that only the steps advance
    monkeypatch.setattr('fan.bench.throughput.time.perf_counter', lambda: clock[0])
    durations = iter([0.5, 0.01, 0.04, 0.02])  # the first is the warm-up
    syncs = []

    def step():
        clock[0] += next(durations)

    times = time_steps(step, warmup=1, repeats=3, synchronize=lambda: syncs.append(clock[0]))
    assert times == pytest.approx([0.01, 0.04, 0.02])
    assert syncs == pytest.approx([0.5, 0.51, 0.55, 0.57])  # after the warm-up and after each timed step
    with pytest.raises(ValueError, match='repeats'):
        time_steps(step, warmup=0, repeats=0, synchronize=lambda: None)


def test_time_interleaved_takes_turns(monkeypatch):
    clock, order = [0.0], []
    monkeypatch.setattr('fan.bench.throughput.time.perf_counter', lambda: clock[0])

    def make_step(name, duration):
        def step():
            order.append(name)
            clock[0] += duration
        return step

    times = time_interleaved([make_step('a', 0.1), make_step('b', 0.3)], warmup=1, repeats=2, synchronize=lambda: None)
    assert order == ['a', 'b'] * 3
    assert times == [pytest.approx([0.1, 0.1]), pytest.approx([0.3, 0.3])]


def test_fvcore_gmacs_matches_the_multiply_add_formula():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    conv = 8 * 16 * 16 * (3 * 3 * 3)  # output elements x multiply-adds per output
    linear = 8 * 16 * 16 * 10
    assert fvcore_gmacs(model, (3, 16, 16)) * 1e9 == pytest.approx(conv + linear, abs=0.5)
    assert count_params(model) == (8 * 3 * 9 + 8) + (2048 * 10 + 10)


def test_count_gmacs_counts_attention_and_keeps_the_fused_setting():
    fused_before = timm.layers.use_fused_attn()
    assert fused_before, 'this torch should have fused attention on by default'
    gmacs = count_gmacs('vit_tiny_patch16_224', (3, 64, 64), img_size=64)
    assert timm.layers.use_fused_attn() == fused_before
    fused_model = timm.create_model('vit_tiny_patch16_224', img_size=64)  # fused: fvcore misses Q K^T and A V
    tokens, dim, depth = 1 + (64 // 16) ** 2, 192, 12
    attention_matmuls = depth * 2 * tokens * tokens * dim
    assert (gmacs - fvcore_gmacs(fused_model, (3, 64, 64))) * 1e9 == pytest.approx(attention_matmuls, abs=1)


def test_peak_memory_of_a_child_is_its_own():
    big = run_in_child(_allocate_and_measure, 200)
    small = run_in_child(_allocate_and_measure, 40)  # a fresh process: the 200 MiB peak does not carry over
    assert 190 <= big <= 230
    assert 36 <= small <= 70


def test_run_in_child_reports_errors_and_timeouts():
    with pytest.raises(ChildError, match="ValueError: invalid literal") as info:
        run_in_child(int, 'not a number')
    assert 'Traceback' in info.value.details
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match='within 1 s'):
        run_in_child(time.sleep, 60, timeout=1)
    assert time.perf_counter() - start < 20


def test_resolve_models_and_input_sizes():
    assert resolve_models(['resnet18', 'fan_tiny_*', 'resnet18']) == [
        'resnet18', 'fan_tiny_8_p4_hybrid', 'fan_tiny_12_p16_224']
    assert resolve_models(['fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384']) == [
        'fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384']
    with pytest.raises(ValueError, match="unknown model 'fan_nonexistent'"):
        resolve_models(['fan_nonexistent'])
    with pytest.raises(ValueError, match=r"no registered model matches 'nothing_\*'"):
        resolve_models(['nothing_*'])
    assert resolve_input_size('fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384', None) == ((3, 384, 384), {})
    assert resolve_input_size('resnet18', 64) == ((3, 64, 64), {})  # any size: no rebuild
    assert resolve_input_size('swin_tiny_patch4_window7_224', 256) == ((3, 256, 256), {'img_size': 256})
    with pytest.raises(ValueError, match='dtype'):
        BenchSettings(dtype='int8')


def test_published_top1():
    assert published_top1('fan_tiny_12_p16_224') == 79.2
    assert published_top1('fan_large_16_p4_hybrid') == 84.3  # the ImageNet-1K model, not the 22K default weights
    assert published_top1('fan_large_16_p4_hybrid.nv_in22k_ft_in1k_384') == 87.1
    assert published_top1('fan_base_16_p4_hybrid.nv_in22k') is None  # 22K classifier: no ImageNet-1K result
    assert published_top1('fan_swin_tiny_patch4_window7_224') is None
    assert published_top1('deit_small_patch16_224') == 79.8
    assert published_top1('resnet18') is None


def _bench_args(argv):
    parser = argparse.ArgumentParser()
    bench_cli.add_commands(parser.add_subparsers(dest='command'))
    return parser.parse_args(argv)


def test_bench_command_end_to_end(tmp_path, capsys):
    out = tmp_path / 'bench'
    args = _bench_args(['bench', 'resnet18', 'fan_tiny_12_p16_224', '-b', '2', '--img-size', '64', '--warmup', '1',
                        '--repeats', '3', '--out', str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert 'fan_tiny_12_p16_224' in printed and 'multiply-add' in printed

    with (out / 'bench.csv').open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        csv_rows = list(reader)
    assert [r['model'] for r in csv_rows] == ['resnet18', 'fan_tiny_12_p16_224']
    document = json.loads((out / 'bench.json').read_text())
    assert document['settings']['batch_size'] == 2 and document['machine']['cpu_count'] >= 1
    resnet, fan_tiny = document['rows']
    for row in (resnet, fan_tiny):
        assert not row.get('error')
        for mode in ('infer', 'train'):
            times = row[f'{mode}_step_times_ms']
            assert len(times) == 3 and min(times) > 0
            assert row[f'{mode}_samples_per_sec'] == pytest.approx(2 / (statistics.median(times) / 1e3))
            assert row[f'{mode}_peak_mem_mib'] > 0
        assert row['train_peak_mem_mib'] > row['infer_peak_mem_mib']  # gradients, momentum, saved activations
        assert row['img_size'] == 64
    reference = timm.create_model('resnet18')
    assert resnet['param_count_m'] * 1e6 == count_params(reference)
    assert resnet['gmacs'] == pytest.approx(fvcore_gmacs(reference, (3, 64, 64)))
    assert fan_tiny['published_top1'] == 79.2 and resnet['published_top1'] is None
    for name in ('throughput_vs_params.png', 'train_throughput_vs_params.png', 'gmacs_vs_top1.png'):
        assert (out / name).stat().st_size > 10_000

    # resume keeps finished rows (a marker value survives) and refuses other settings
    document['rows'][0]['infer_samples_per_sec'] = -1.0
    (out / 'bench.json').write_text(json.dumps(document))
    settings = bench_cli.settings_from_args(args)
    rows = run_benchmark(['resnet18'], settings, out, resume=True)
    assert rows[0]['infer_samples_per_sec'] == -1.0
    with pytest.raises(ValueError, match='other settings'):
        run_benchmark(['resnet18'], replace(settings, batch_size=4), out, resume=True)


def test_a_failing_model_is_reported_and_saved(tmp_path):
    settings = BenchSettings(batch_size=1, img_size=40, warmup=0, repeats=1)  # FAN needs multiples of 16
    rows = run_benchmark(['fan_tiny_12_p16_224'], settings, tmp_path, modes=('infer',), count_flops=False)
    assert 'not a multiple of the stem stride 16' in rows[0]['error']
    assert 'Traceback' in rows[0]['infer_traceback']
    assert json.loads((tmp_path / 'bench.json').read_text())['rows'][0]['error'] == rows[0]['error']


def test_cli_defaults_depend_on_the_device():
    cpu = bench_cli.settings_from_args(_bench_args(['bench', '--device', 'cpu', '--amp']))
    assert (cpu.batch_size, cpu.warmup, cpu.repeats, cpu.dtype) == (8, 2, 5, 'bf16')
    if torch.cuda.is_available():
        cuda = bench_cli.settings_from_args(_bench_args(['bench', '--device', 'cuda', '--warmup', '0']))
        assert (cuda.batch_size, cuda.warmup, cuda.repeats) == (128, 0, 20)
    else:
        with pytest.raises(UserError, match='CUDA is not available'):
            bench_cli.settings_from_args(_bench_args(['bench', '--device', 'cuda']))


def test_bad_input_ends_the_command_with_one_line(tmp_path, capsys):
    assert main(['bench', 'no_such_model', '--out', str(tmp_path)]) == 2
    assert "fan bench: error: unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(['cards', '--check', '--dir', str(tmp_path / 'missing')]) == 2
    assert 'fan cards: error: no card folder' in capsys.readouterr().err


def test_pair_ratios_and_targets():
    fan_row = {'model': 'fan_tiny_12_p16_224', 'batch_size': 16, 'threads': 2, 'infer_samples_per_sec': 35.0,
               'train_samples_per_sec': 9.0, 'train_peak_mem_mib': 1100.0}
    peer_row = {'model': 'xcit_tiny_12_p16_224', 'batch_size': 16, 'threads': 2, 'infer_samples_per_sec': 50.0,
                'train_samples_per_sec': 10.0, 'train_peak_mem_mib': 1000.0}
    row = pair_ratios(fan_row, peer_row, {'batch_size': 32, 'train_peak_mem_mib': 2000.0},
                      {'batch_size': 32, 'train_peak_mem_mib': 1300.0})
    assert row['infer_ratio'] == pytest.approx(0.70)
    assert row['train_ratio'] == pytest.approx(0.90)
    assert row['train_mem_ratio'] == pytest.approx(1.10)
    assert row['ckpt_mem_cut'] == pytest.approx(0.35)
    assert row['targets_missed'] == 'train_ratio >= 0.95; ckpt_mem_cut >= 0.4'
    assert row['targets_met'] == 'infer_ratio >= 0.7; train_mem_ratio <= 1.1'


def test_compare_with_peers_end_to_end(tmp_path):
    settings = BenchSettings(batch_size=2, img_size=64, warmup=0, repeats=2)
    (row,) = compare_with_peers(tmp_path, [('fan_tiny_12_p16_224', 'vit_tiny_patch16_224')], settings,
                                ckpt_batch_size=4)
    interleaved = json.loads((tmp_path / 'interleaved.json').read_text())['results']
    infer = interleaved['fan_tiny_12_p16_224 vs vit_tiny_patch16_224: infer']
    assert row['infer_ratio'] == pytest.approx(
        infer['fan_tiny_12_p16_224']['infer_samples_per_sec'] / infer['vit_tiny_patch16_224']['infer_samples_per_sec'])
    assert len(infer['fan_tiny_12_p16_224']['infer_step_times_ms']) == 2
    memory = {r['model']: r for r in json.loads((tmp_path / 'memory' / 'bench.json').read_text())['rows']}
    assert row['train_mem_ratio'] == pytest.approx(
        memory['fan_tiny_12_p16_224']['train_peak_mem_mib'] / memory['vit_tiny_patch16_224']['train_peak_mem_mib'])
    off, on = (json.loads((tmp_path / folder / 'bench.json').read_text())['rows'][0]
               for folder in ('ckpt_off', 'ckpt_on'))
    assert (off['batch_size'], off['grad_checkpointing'], on['grad_checkpointing']) == (4, False, True)
    assert row['ckpt_mem_cut'] == pytest.approx(1 - on['train_peak_mem_mib'] / off['train_peak_mem_mib'])
    with (tmp_path / 'fan_vs_peer.csv').open() as f:
        assert next(csv.DictReader(f))['peer_model'] == 'vit_tiny_patch16_224'


def test_format_table():
    rows = [{'model': 'a', 'gmacs': 1.23456}, {'model': 'long_name', 'gmacs': None}]
    lines = format_table(rows, ['model', 'gmacs'], ['model', 'GMACs']).splitlines()
    assert lines[0].split() == ['model', 'GMACs'] and lines[2].split() == ['a', '1.235']
    assert lines[3].split() == ['long_name', '-']
    assert format_table(rows, ['model'], markdown=True).splitlines()[1] == '|---|'


def test_gpu_script_runs_on_the_cpu_quick(tmp_path):
    """benchmarks/gpu.sh --device cpu --quick: two models eager in both modes, the merged CSV and Markdown table."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'gpu.sh'
    run = subprocess.run(['bash', str(script), '--device', 'cpu', '--quick', '--out', str(tmp_path)],
                         env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with (tmp_path / 'gpu.csv').open() as f:
        rows = {row['model']: row for row in csv.DictReader(f)}
    assert sorted(rows) == ['deit_tiny_patch16_224', 'fan_tiny_12_p16_224']
    for row in rows.values():
        assert float(row['eager_infer']) > 0 and float(row['eager_train']) > 0 and not row['compiled_infer']
    table = (tmp_path / 'gpu.md').read_text()
    assert '| fan_tiny_12_p16_224 |' in table and 'inference batch 2' in table


def _vs_official_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / 'benchmarks' / 'vs_official.py'
    spec = importlib.util.spec_from_file_location('vs_official', path)
    vs_official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs_official)
    return vs_official


def test_vs_official_summarizes_each_variant_against_the_official_code():
    """benchmarks/vs_official.py: one row per model and variant, medians over rounds, ratios against the official
    medians, the plain targets (>= 1.0 / 1.0, memory <= 0.9) and the optimized ones (the former in-model ratios)."""
    vs_official = _vs_official_module()
    name = 'fan_tiny_12_p16_224'

    def run(impl, variant, infer, train, rss):
        return dict(model=name, impl=impl, variant=variant, precision='fp32', infer_img_s=infer, train_img_s=train,
                    peak_rss_mib=rss)

    runs = [run('official', 'official', 10., 5., 1000.), run('official', 'official', 12., 5., 1000.),
            run('ours', 'plain', 11., 5.5, 800.), run('ours', 'plain', 13., 4.5, 800.),
            run('ours', 'optimized', 14., 5.2, 850.), run('ours', 'optimized', 12., 5.2, 850.),
            dict(model=name, impl='ours', variant='compiled', precision='fp32', infer_img_s=22., compile=True)]
    plain, optimized, compiled = vs_official.summarize(runs, [name])
    assert (plain['variant'], plain['infer_ratio'], plain['train_ratio']) == ('plain', 1.0909090909090908, 1.0)
    assert plain['memory_ratio'] == pytest.approx(0.8) and plain['targets_missed'] == ''
    assert optimized['infer_ratio'] == pytest.approx(13 / 11) and optimized['infer_vs_plain'] == pytest.approx(13 / 12)
    assert optimized['targets_missed'] == 'train_ratio >= 1.09'  # inference 1.18 met, training 1.04 missed
    assert compiled['infer_ratio'] == 2.0 and 'train_ratio' not in compiled


def test_vs_official_judges_the_bf16_target_on_the_paired_measure():
    """benchmarks/vs_official.py's bf16 summary: the fresh-process speed-up is the ratio of the medians, the paired
    one the median of the paired processes' ratios, and the target (1.6x) is judged on the paired one when present."""
    vs_official = _vs_official_module()

    def run(precision, **rates):
        return dict(model='m', impl='ours', variant='optimized', precision=precision, compile=False,
                    matmul_fp32_gmacs=100., matmul_bf16_gmacs=200., **rates)

    runs = [run('fp32', infer_img_s=10.), run('fp32', infer_img_s=30.), run('bf16', infer_img_s=25.),
            run('bf16', infer_img_s=35.)]
    row, = vs_official.summarize_bf16(runs, ['m'])
    assert row['bf16_speedup'] == pytest.approx(1.5) and row['bf16_target_met'] is False
    assert row['matmul_bf16_over_fp32'] == pytest.approx(2.)
    runs += [run('paired', fp32_infer_img_s=20., bf16_infer_img_s=34., bf16_over_fp32=r) for r in (1.5, 1.7, 1.9)]
    row, = vs_official.summarize_bf16(runs, ['m'])
    assert row['bf16_speedup'] == pytest.approx(1.5)  # (paired processes leave the fresh-process figures alone)
    assert row['bf16_speedup_paired'] == pytest.approx(1.7) and row['bf16_target_met'] is True
    assert row['paired_fp32_infer_img_s'] == 20. and row['paired_bf16_infer_img_s'] == 34.

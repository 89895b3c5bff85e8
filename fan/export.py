"""``fan export``: a model (any weights the model path loads) as ONNX, TorchScript, a ``torch.export`` program or
timm's Hugging Face layout, each verified against the PyTorch model before the command reports success.

- ``onnx``: ``torch.onnx.export`` (dynamo) with a dynamic batch and, where the model takes any size, a dynamic image
  height and width (FAN-ViT, FAN-Hybrid; FAN-Swin is built with ``dynamic_img_size=True`` for it); run in
  onnxruntime on two input shapes and compared with PyTorch (max error / max |output| < 1e-4).
- ``torchscript``: ``torch.jit.script``; ``exported``: ``torch.export.export`` saved as ``.pt2`` (same dynamic
  dimensions as ONNX); ``hub``: ``config.json`` + ``model.safetensors`` written by timm's ``save_for_hf``, which
  ``timm.create_model('local-dir:OUT', pretrained=True)`` loads back (after ``import fan``).

``OUT/export.json`` records the model, weights, format, files, opset, dynamic dimensions and the measured errors.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import timm
import torch
import torch.nn as nn

from .errors import UserError, require_extra
from .factory import resolve_data_config
from .io import write_json
from .options import add_model_options, add_out_option, model_from_args, positive_int
from .registry import family_of

__all__ = ['FORMATS', 'TOLERANCE', 'takes_any_size', 'export_model']

FORMATS = ('onnx', 'torchscript', 'exported', 'hub')
TOLERANCE = 1e-4  # max |exported - eager| / max |eager|
DEFAULT_OPSET = 18


def takes_any_size(model: nn.Module) -> bool:
    """Whether the model accepts images of any (stride-multiple) size, so that the export can keep H, W dynamic."""
    if hasattr(model, 'dynamic_img_size'):  # timm's Swin / ViT families, FAN-Swin included
        return bool(model.dynamic_img_size)
    return not getattr(model, 'pretrained_cfg', {}).get('fixed_input_size', False)


def _check_shapes(input_size: Tuple[int, int, int], any_size: bool) -> List[Tuple[int, ...]]:
    """Two verification inputs: batch 3 at the model's size, and batch 1 with a 64 px wider image (if any size)."""
    channels, height, width = input_size
    return [(3, channels, height, width), (1, channels, height, width + 64 if any_size else width)]


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-12))


def _verify(run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, shapes: List[Tuple[int, ...]]
            ) -> List[Dict[str, Any]]:
    """Run the exported artefact and the model on random inputs of each shape; fail above :data:`TOLERANCE`."""
    checks = []
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            error = _relative_error(run(x), model(x))
        checks.append({'input_shape': list(shape), 'max_relative_error': error})
        if not error < TOLERANCE:
            raise RuntimeError(f'exported model differs from PyTorch at input {shape}: relative error {error:.2e}')
    return checks


def _dynamic_shapes(any_size: bool) -> Dict[str, Dict[int, Any]]:
    from torch.export import Dim

    dims: Dict[int, Any] = {0: Dim('batch', min=1, max=4096)}
    if any_size:
        dims.update({2: Dim.AUTO, 3: Dim.AUTO})
    return {'x': dims}


def _onnx_opset(path: Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    onnx = require_extra('onnx', 'export')
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ('', 'ai.onnx'))


def export_model(model: nn.Module, fmt: str, out_dir: Path, opset: int = DEFAULT_OPSET) -> Dict[str, Any]:
    """Export ``model`` (put in eval mode) to ``out_dir`` in ``fmt`` and verify it; returns the manifest."""
    if fmt not in FORMATS:
        raise UserError(f'unknown export format {fmt!r}; choose from {", ".join(FORMATS)}')
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    input_size = tuple(resolve_data_config(model)['input_size'])
    any_size = takes_any_size(model)
    shapes = _check_shapes(input_size, any_size)
    example = torch.randn(2, *input_size)
    manifest: Dict[str, Any] = {
        'format': fmt, 'input_size': list(input_size), 'dynamic': ['batch'] + (['height', 'width'] if any_size else []),
        'torch': torch.__version__, 'timm': timm.__version__,
    }
    if fmt == 'onnx':
        ort = require_extra('onnxruntime', 'export')
        require_extra('onnxscript', 'export')
        path = out_dir / 'model.onnx'
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=_dynamic_shapes(any_size),
                          opset_version=opset, input_names=['images'], output_names=['output'], verbose=False)
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        written = _onnx_opset(path)  # the converter may fall back to another opset than the one asked for
        manifest.update(files=[path.name], opset=written, runtime=f'onnxruntime {ort.__version__}')
        if written != opset:
            manifest['requested_opset'] = opset
            print(f'fan export: the ONNX converter could not write opset {opset} and wrote opset {written}',
                  file=sys.stderr)
        manifest['checks'] = _verify(lambda x: torch.from_numpy(session.run(None, {'images': x.numpy()})[0]),
                                     model, shapes)
    elif fmt == 'torchscript':
        path = out_dir / 'model.pt'
        scripted = torch.jit.script(model)
        scripted.save(str(path))
        loaded = torch.jit.load(str(path))
        manifest.update(files=[path.name], checks=_verify(loaded, model, shapes))
    elif fmt == 'exported':
        path = out_dir / 'model.pt2'
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(any_size))
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
        manifest.update(files=[path.name], checks=_verify(loaded, model, shapes))
    else:
        from timm.models import save_for_hf

        save_for_hf(model, str(out_dir), model_args=_model_args(model), safe_serialization=True)
        reloaded = timm.create_model(f'local-dir:{out_dir}', pretrained=True).eval()
        manifest.update(files=['config.json', 'model.safetensors'],
                        load_with=f"import fan; timm.create_model('local-dir:{out_dir}', pretrained=True)",
                        checks=_verify(reloaded, model, shapes))
    write_json(out_dir / 'export.json', manifest)
    return manifest


def _model_args(model: nn.Module) -> Dict[str, Any]:
    """Constructor arguments the hub config must carry to rebuild this model (its head size, dynamic size)."""
    args: Dict[str, Any] = {'num_classes': model.num_classes}
    if getattr(model, 'dynamic_img_size', False):
        args['dynamic_img_size'] = True
    return args


def _run_export(args: argparse.Namespace) -> int:
    family = family_of(args.model)
    # one graph for every image size where the family needs an option for it (FAN-Swin: dynamic_img_size)
    extra = family.any_size_kwargs if family is not None and args.format in ('onnx', 'exported') else {}
    model = model_from_args(args, optimize=False, **extra)  # the plain model: what TorchScript and exporters take
    manifest = export_model(model, args.format, args.out, args.opset)
    errors = ', '.join(f'{tuple(c["input_shape"])}: {c["max_relative_error"]:.1e}' for c in manifest['checks'])
    print(f'{args.model} -> {args.out}/{", ".join(manifest["files"])} ({args.format}'
          + (f', opset {manifest["opset"]}' if 'opset' in manifest else '')
          + f'; dynamic: {", ".join(manifest["dynamic"])}); max relative error vs PyTorch {errors}')
    return 0


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        'export', help='export a model to ONNX, TorchScript, torch.export (.pt2) or the Hugging Face hub layout',
        description='Writes the model and OUT/export.json; every export is run and compared with PyTorch first.')
    add_model_options(parser, optimize=False)
    parser.add_argument('--format', choices=FORMATS, default='onnx', help='default: %(default)s')
    parser.add_argument('--opset', type=positive_int, default=DEFAULT_OPSET, help='ONNX opset (default: %(default)s)')
    add_out_option(parser, 'export-out')
    parser.set_defaults(func=_run_export)

"""Test-suite set-up: fetch timm's own model tests (the peer suite) for the installed timm version.

timm's ``tests/test_models.py`` ships only in timm's sdist. It is downloaded from the package registry on the first
run into ``tests/timm_peer/_timm/`` (git-ignored); set ``FAN_SKIP_PEER=1`` to run without it.
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

PEER_FILE = Path(__file__).parent / 'timm_peer' / '_timm' / 'test_models.py'


def _fetch_timm_model_tests(version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if result.returncode or not sdists:
            raise pytest.UsageError(
                f'could not download the timm {version} sdist for its model tests ({" ".join(cmd)}):\n'
                f'{result.stderr.strip()}\nSet FAN_SKIP_PEER=1 to run the suite without the peer tests.')
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f'timm-{version}/tests/test_models.py')
            PEER_FILE.parent.mkdir(parents=True, exist_ok=True)
            PEER_FILE.write_bytes(tar.extractfile(member).read())


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get('FAN_SKIP_PEER'):
        return
    import timm
    version_file = PEER_FILE.with_name('VERSION')
    if not PEER_FILE.exists() or not version_file.exists() or version_file.read_text() != timm.__version__:
        _fetch_timm_model_tests(timm.__version__)
        version_file.write_text(timm.__version__)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool:
    return bool(os.environ.get('FAN_SKIP_PEER')) and collection_path == PEER_FILE

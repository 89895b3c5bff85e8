"""Test-suite set-up: fetch timm's own model tests (the peer suite) for the installed timm version.

timm's ``tests/test_models.py`` ships only in timm's sdist. It is downloaded from the package registry on the first
run into ``tests/timm_peer/_timm/`` (git-ignored). Offline, the peer part is skipped with the reason, unless
``FAN_REQUIRE_PEER=1`` (CI) makes a failed download an error; ``FAN_SKIP_PEER=1`` skips it on purpose.
"""
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

import pytest

PEER_FILE = Path(__file__).parent / 'timm_peer' / '_timm' / 'test_models.py'
_peer_skip_reason: Optional[str] = None


def _fetch_timm_model_tests(version: str) -> Optional[str]:
    """Download timm's sdist and extract its model tests; returns why not, or None when done."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f'timm=={version}', '-d', tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f'downloading the timm {version} sdist timed out'
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if result.returncode or not sdists:
            last = (result.stderr.strip().splitlines() or ['no sdist'])[-1]
            return f'could not download the timm {version} sdist for its model tests ({last})'
        with tarfile.open(sdists[0]) as tar:
            member = tar.getmember(f'timm-{version}/tests/test_models.py')
            PEER_FILE.parent.mkdir(parents=True, exist_ok=True)
            PEER_FILE.write_bytes(tar.extractfile(member).read())
    return None


def pytest_configure(config: pytest.Config) -> None:
    global _peer_skip_reason
    if os.environ.get('FAN_SKIP_PEER'):
        _peer_skip_reason = 'FAN_SKIP_PEER is set'
        return
    import timm
    version_file = PEER_FILE.with_name('VERSION')
    if PEER_FILE.exists() and version_file.exists() and version_file.read_text() == timm.__version__:
        return
    reason = _fetch_timm_model_tests(timm.__version__)
    if reason is None:
        version_file.write_text(timm.__version__)
    elif os.environ.get('FAN_REQUIRE_PEER'):
        raise pytest.UsageError(f'{reason}; FAN_REQUIRE_PEER is set, so the peer suite must run')
    else:
        _peer_skip_reason = f'timm peer suite skipped: {reason}'


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    return _peer_skip_reason


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool:
    return _peer_skip_reason is not None and collection_path == PEER_FILE


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _peer_skip_reason:
        terminalreporter.write_line(f'NOTE: {_peer_skip_reason}', yellow=True)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface, for torchrun's rendezvous."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]

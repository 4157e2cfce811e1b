"""Fixtures for the millrace Python tests: the binary under test and megatron-core's writer."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import megatron_ref  # noqa: E402


class Millrace:
    """Runs the millrace binary and checks the generic contract of its output."""

    def __init__(self, path: Path):
        self.path = path

    def run(self, *args) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.path), *map(str, args)], capture_output=True,
                              text=True, timeout=120)
        assert "panicked" not in proc.stderr, f"millrace panicked:\n{proc.stderr}"
        return proc

    def json(self, *args):
        """Run, require success and exactly one JSON object on stdout."""
        proc = self.run(*args)
        assert proc.returncode == 0, f"millrace {args} exited {proc.returncode}:\n{proc.stderr}"
        value = json.loads(proc.stdout)
        assert isinstance(value, dict), proc.stdout[:500]
        return value

    def fail(self, *args) -> str:
        """Run, require a non-zero exit; return stderr."""
        proc = self.run(*args)
        assert proc.returncode != 0, f"millrace {args} succeeded:\n{proc.stdout[:2000]}"
        return proc.stderr


@pytest.fixture(scope="session")
def millrace() -> Millrace:
    env = os.environ.get("MILLRACE_BIN")
    path = Path(env) if env else REPO_ROOT / "target" / "debug" / "millrace"
    if not env and not path.exists():
        proc = subprocess.run(["cargo", "build"], cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"cargo build failed:\n{proc.stderr[-4000:]}")
    if not path.exists():
        pytest.fail(f"millrace binary not found at {path}")
    return Millrace(path)


@pytest.fixture(scope="session")
def megatron():
    """megatron-core's indexed_dataset module; required in CI, skipped offline elsewhere."""
    try:
        return megatron_ref.load_megatron_indexed_dataset_module()
    except megatron_ref.MegatronUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"megatron-core {megatron_ref.MEGATRON_CORE_VERSION} is required in CI "
                        f"but could not be downloaded: {e}")
        pytest.skip(f"megatron-core wheel could not be downloaded (offline?); set CI to make "
                    f"this a failure: {e}")


@pytest.fixture
def short_dir():
    """A short directory for sockets (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mrt", dir="/tmp"))
    yield d
    for p in d.iterdir():
        try:
            p.unlink()
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass

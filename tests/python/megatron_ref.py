"""megatron-core's own IndexedDatasetBuilder, loaded without torch.

``megatron/core/datasets/indexed_dataset.py`` is taken from the megatron-core wheel (downloaded
once with ``pip download --no-deps``) and executed with stub modules standing in for torch and
the few megatron modules it imports. The builder itself only needs numpy and ``open``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

MEGATRON_CORE_VERSION = "0.16.1"
# Under target/, with the rest of the build and test debris (cargo clean removes it).
DEFAULT_CACHE_DIR = str(Path(__file__).resolve().parents[2] / "target" / "megatron-wheel")
_MODULE_PATH = "megatron/core/datasets/indexed_dataset.py"
_MODULE_NAME = "millrace_megatron_indexed_dataset"


class MegatronUnavailable(RuntimeError):
    """The megatron-core wheel could not be downloaded."""


class NumpyTensor:
    """What ``IndexedDatasetBuilder.add_item`` needs from a tensor: a ``.numpy()`` method."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


def _wheel(cache_dir: Path) -> Path:
    for candidate in sorted(cache_dir.glob(f"megatron_core-{MEGATRON_CORE_VERSION}-*.whl")):
        try:
            with zipfile.ZipFile(candidate) as z:
                z.getinfo(_MODULE_PATH)
            return candidate
        except (zipfile.BadZipFile, KeyError):
            candidate.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", f"megatron-core=={MEGATRON_CORE_VERSION}", "-d", str(cache_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MegatronUnavailable(f"{' '.join(cmd)}: {e}") from e
    wheels = sorted(cache_dir.glob(f"megatron_core-{MEGATRON_CORE_VERSION}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise MegatronUnavailable(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return wheels[0]


def _stubs() -> dict:
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    class Dataset:  # torch.utils.data.Dataset
        pass

    class MultiStorageClientFeature:
        @staticmethod
        def is_enabled():
            return False

        @staticmethod
        def import_package():
            raise RuntimeError("multi-storage client is stubbed out in millrace tests")

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("object storage is stubbed out in millrace tests")

    data = module("torch.utils.data", Dataset=Dataset)
    utils = module("torch.utils", data=data)
    torch = module("torch", utils=utils, Tensor=object)
    storage = module(
        "megatron.core.datasets.object_storage_utils",
        S3Config=type("S3Config", (), {}),
        ObjectStorageConfig=type("ObjectStorageConfig", (), {}),
        cache_index_file=unavailable,
        dataset_exists=unavailable,
        get_index_cache_path=unavailable,
        get_object_storage_access=unavailable,
        is_object_storage_path=lambda _path: False,
        parse_s3_path=unavailable,
    )
    datasets = module("megatron.core.datasets", object_storage_utils=storage)
    msc = module("megatron.core.msc_utils", MultiStorageClientFeature=MultiStorageClientFeature)
    mutils = module("megatron.core.utils", log_single_rank=lambda *a, **k: None)
    core = module("megatron.core", datasets=datasets, msc_utils=msc, utils=mutils)
    megatron = module("megatron", core=core)
    return {m.__name__: m for m in (torch, utils, data, megatron, core, datasets, storage, msc,
                                     mutils)}


def load_megatron_indexed_dataset_module(cache_dir=None):
    """Return megatron-core's ``indexed_dataset`` module (IndexedDatasetBuilder, DType, ...).

    Raises MegatronUnavailable when the wheel is not cached and cannot be downloaded.
    """
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    cache_dir = Path(cache_dir or os.environ.get("MILLRACE_MEGATRON_WHEEL_DIR", DEFAULT_CACHE_DIR))
    wheel = _wheel(cache_dir)
    source_path = cache_dir / f"indexed_dataset-{MEGATRON_CORE_VERSION}.py"
    with zipfile.ZipFile(wheel) as z:
        source = z.read(_MODULE_PATH)
    if not source_path.exists() or source_path.read_bytes() != source:
        source_path.write_bytes(source)

    stubs = _stubs()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, source_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_MODULE_NAME]
            raise
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module

"""Test-wide set-up: 8 fake CPU devices and the import shim that lets timm load without
torchvision (timm only needs a few torchvision names at import time; see README, Testing)."""

import os

# Must happen before the first `import jax` anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run, shared by the xdist workers and the processes
# tests start: the tiny models' programs recur across tests (keys include the program, the
# compile options and the jax version, so a stale entry is never used).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import importlib.abc
import importlib.machinery
import sys
import types

import pytest


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Placeholder,), {})


class _Placeholder(metaclass=_PlaceholderMeta):
    """Stands in for torchvision names timm references (enum members included) but the tests
    never call."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is not installed; this timm feature is unavailable")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (_Placeholder,), {})
        setattr(self, name, placeholder)
        return placeholder


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        # transformers parses torchvision.__version__ when it sees the package.
        module.__version__ = "0.0"
        return module

    def exec_module(self, module):
        pass


def _install_torchvision_stub():
    try:
        import torchvision  # noqa: F401  (a working real install wins)
        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionStubFinder())
    try:
        import torch
        import torchvision.ops.misc
        torchvision.ops.misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d
    except ImportError:
        pass


_install_torchvision_stub()


@pytest.fixture(scope="module", autouse=True)
def cheap_compilation(request):
    """In modules marked ``pytestmark = pytest.mark.cheap_compilation``: compiles their programs
    without XLA's LLVM optimization of the CPU code (``jax_disable_most_optimizations``), about
    40% less compile time, slower to run. For modules that compile large programs, run them a
    few steps and compare only programs compiled the same way. Autouse, so it is in force before
    any of the module's own fixtures compiles."""
    if request.node.get_closest_marker("cheap_compilation") is None:
        yield
        return
    import jax

    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)

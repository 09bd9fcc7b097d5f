"""Test-wide set-up: 8 fake CPU devices, one persistent compilation cache, compilation without
LLVM optimization and with XLA's classic CPU emitters, and the import shim that lets timm load
without torchvision (timm only needs a few torchvision names at import time; see README,
Testing)."""

import os

# Must happen before the first `import jax` anywhere in the test process. XLA's classic CPU
# emitters (--xla_cpu_use_fusion_emitters=false) compile a program in 35-45% less time than its
# MLIR fusion emitters (the demo's train step 81 s -> 53 s, its predictor programs 4.6-8.9 s ->
# 1.4-2.5 s) with the same results; processes that tests start keep these flags but the device
# count (tests/xla_flags.py).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run, shared by the xdist workers and the processes
# tests start: the tiny models' programs recur across tests (keys include the program, the
# compile options and the jax version, so a stale entry is never used).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# Every program compiles without XLA's LLVM optimization of the CPU code
# (jax_disable_most_optimizations; the processes tests start inherit it): a test's cost is
# mostly compiling programs it then runs a few times, and this cuts the compilation's CPU time by
# about 40% (the tiny model's tests: 280 s -> 168 s of CPU, 10 tests). Programs still compile
# through every HLO pass, so results and FLOP counts are the optimized programs' within float
# tolerance.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


import importlib.abc
import importlib.machinery
import sys
import types


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

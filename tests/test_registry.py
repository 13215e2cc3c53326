"""The op registry's choice of implementation, with and without the C++ extension."""

import os
import subprocess
import sys

import pytest

from ops_cases import LAUNCHERS, needs_triton  # tests/ is on sys.path under pytest

# Make every ttsearch._C_<isa> (one module per CPU ISA level) fail to import, as in an install
# without a compiler.
BLOCK_C = """
import importlib.abc, sys, warnings
class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("ttsearch._C"):
            raise ImportError("no C++ extension in this install")
sys.meta_path.insert(0, NoExtension())
"""


def run_python(code: str, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TTSEARCH_OPS": mode}
    return subprocess.run([sys.executable, "-W", "always", "-c", BLOCK_C + code], capture_output=True, text=True,
                          env=env, timeout=120)


def test_without_the_extension_ops_run_on_the_reference_with_one_warning():
    out = run_python(
        "import torch, ttsearch.ops as ops\n"
        "print(ops.IMPLEMENTATIONS['cpu'])\n"
        "kv = torch.randn(2, 1, 4, 16, 1, 16)\n"
        "ops.copy_blocks(kv, torch.tensor([0]), torch.tensor([3]))\n"
        "print(torch.equal(kv[:, :, 3], kv[:, :, 0]))\n",
        "auto",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "True"]
    assert out.stderr.count("ttsearch._C_<isa> is not built") == 1


def test_requiring_fast_ops_without_the_extension_raises():
    out = run_python("import ttsearch.ops", "fast")
    assert out.returncode != 0
    assert "TTSEARCH_OPS=fast but the C++ extension ttsearch._C_<isa> did not load" in out.stderr


def test_unknown_mode_is_an_error():
    out = run_python("import ttsearch.ops", "turbo")
    assert "TTSEARCH_OPS='turbo'" in out.stderr


@pytest.mark.skipif(os.environ.get("TTSEARCH_OPS") == "reference", reason="a pure-Python run, chosen on purpose")
def test_the_cpp_extension_serves_every_op_on_the_cpu():
    """An install must carry the fast path: a build that failed is an error, never a quiet fallback."""
    import torch

    import ttsearch.ops as ops
    from ttsearch.ops import cpu_isa, registry

    impl = ops.IMPLEMENTATIONS["cpu"]
    assert impl.startswith("cpp-") and impl[4:] in cpu_isa.levels(), f"no ttsearch._C_<isa> loaded: {impl}"
    loaded = [name for name in sys.modules if name.startswith("ttsearch._C")]
    assert loaded == [f"ttsearch._C_{impl[4:]}"], f"one ISA level's module per process, got {loaded}"
    missing = [name for name in registry.SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ttsearch::{name}", "CPU")]
    assert not missing, f"ttsearch._C_{impl[4:]} registers no CPU kernel for {missing}"


@needs_triton
def test_register_cuda_registers_every_op_with_its_schema_arguments():
    import inspect

    import torch

    from ttsearch.kernels.registration import register_cuda
    from ttsearch.ops import registry

    calls = []

    class Recorder:
        def impl(self, name, fn, key):
            calls.append((name, fn, key))

    register_cuda(Recorder())

    assert sorted(name for name, _, _ in calls) == sorted(registry.SCHEMAS)
    for name, fn, key in calls:
        assert key == "CUDA"
        schema = torch._C.parse_schema(registry.SCHEMAS[name])
        assert list(inspect.signature(fn).parameters) == [arg.name for arg in schema.arguments], name
        assert fn is LAUNCHERS[name]

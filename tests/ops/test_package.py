"""ops/__init__.py: the lazy facade returns the public functions, never a submodule of the same name."""

import importlib
import pkgutil
import subprocess
import sys
import types

import flasht5.ops


def _submodules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(flasht5.ops.__path__)]


def test_every_public_name_is_a_function_after_importing_every_submodule():
    # Importing a submodule binds it as an attribute of the package; a submodule named like a public function
    # (the old ops/rms_norm.py) then shadowed the function.
    for name in _submodules():
        importlib.import_module(f"flasht5.ops.{name}")
    for name in flasht5.ops.__all__:
        obj = getattr(flasht5.ops, name)
        assert callable(obj) and not isinstance(obj, types.ModuleType), name
    from flasht5.ops import cross_entropy, gated_act, linear_cross_entropy, rms_norm

    for fn in (rms_norm, cross_entropy, linear_cross_entropy, gated_act):
        assert isinstance(fn, types.FunctionType), fn
    assert rms_norm is importlib.import_module("flasht5.ops.norm").rms_norm
    assert linear_cross_entropy is importlib.import_module("flasht5.ops.loss").linear_cross_entropy


def test_no_submodule_is_named_like_a_public_name():
    assert not set(_submodules()) & set(flasht5.ops.__all__)


def test_importing_the_package_imports_no_triton():
    code = (
        "import sys, flasht5.ops, flasht5.ops.relative_position\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'flasht5.ops.norm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Shared by the Triton launchers: where the kernels run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``,
the CPU tests), the float dtypes they take, the (rows, cols) view they read, cached device facts, and the rule that
picks the eager or the traceable route of an op.

Everything here runs on every call of an op, so it is cheap Python (no device query, no torch op) except where a
docstring says otherwise.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_checks() -> bool:
    """``FLASHT5_DEBUG=1``: also run the value checks that read GPU memory (and so synchronise with the GPU)."""
    return os.environ.get("FLASHT5_DEBUG", "0") == "1"


_CUSTOM_OPS: list[str] = []


def custom_op(name: str, **kw):
    """``torch.library.custom_op``, recording the op's name for :func:`allow_inductor_fallback`."""
    _CUSTOM_OPS.append(name)
    return torch.library.custom_op(name, **kw)


def allow_inductor_fallback() -> None:
    """Put flasht5's custom ops on inductor's ``FALLBACK_ALLOW_LIST`` (called by their fake implementations, which run
    while ``torch.compile`` traces, before inductor lowers the graph; inductor is imported by then).

    Inductor runs an op without a lowering as a fallback kernel either way; off that list it first logs
    ``operator_str(target, args, kwargs)``, and torch up to 2.11 formats that string eagerly, logging on or off: a
    recursive ``str`` of the inputs' IR that took minutes on a T5 graph (measured on the H200 machine; vLLM patches
    the same hang). Newer torch formats it lazily; the list is used on every version for one behaviour."""
    global _FALLBACK_ALLOWED
    # An op module imported after the first trace adds its names at its own first trace.
    if len(_CUSTOM_OPS) == _FALLBACK_ALLOWED:
        return
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is not None and hasattr(lowering, "FALLBACK_ALLOW_LIST"):
        lowering.FALLBACK_ALLOW_LIST.update(_CUSTOM_OPS)
        _FALLBACK_ALLOWED = len(_CUSTOM_OPS)


_FALLBACK_ALLOWED = 0  # how many of _CUSTOM_OPS are on inductor's list


def use_custom_op(t: Tensor) -> bool:
    """Whether an op takes its ``torch.library.custom_op`` route instead of the eager ``autograd.Function``.

    The custom ops (with fake implementations and registered autograd) are what ``torch.compile`` traces; they cost
    ~0.7 ms of host time per call in eager mode (``custom_ops.py: backend_impl``, measured on the H200 machine), so
    eager calls go straight to the launchers. Tensor subclasses (fake, functional, meta-device tracing) take the
    custom op too: it is the route that knows how to handle them.
    """
    return type(t) is not Tensor or torch.compiler.is_compiling()


_FUNCTION_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]


def function_apply(cls: type[torch.autograd.Function]):
    """``cls.apply`` without the Python layer of ``torch.autograd.Function.apply`` (~2 us per call, measured on
    CPU): that layer binds default arguments when ``setup_context`` is defined (ours define ``forward(ctx, ...)``
    and no ``setup_context``) and unwraps dead functorch wrappers, then calls the C ``_FunctionBase.apply`` that is
    called here directly. While a functorch transform (vmap, grad, ...) is active the full ``cls.apply`` runs, which
    routes to its functorch rule."""
    direct = _FUNCTION_BASE_APPLY.__get__(None, cls)
    full = cls.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        return full(*args) if transforms_active() else direct(*args)

    return apply


def check_kernel_device(t: Tensor, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` when the kernels cannot run on ``t``'s device."""
    if not t.is_cuda and not interpreting():
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
            "the *_ref functions run anywhere"
        )


def check_float_tensor(t: object, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``t`` is a float32/float16/bfloat16 tensor."""
    if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float32/float16/bfloat16 tensor, got {got}")


def rows_2d(t: Tensor, n_cols: int) -> Tensor:
    """``t`` (..., n_cols) as (rows, n_cols) with a unit column stride: a view whenever the strides allow it (any row
    stride, e.g. ``chunk()``/slice views of a fused projection), else one contiguous copy."""
    t2 = t.reshape(-1, n_cols)  # (N, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def row_major(t: Tensor, n_cols: int) -> tuple[Tensor, int]:
    """``(tensor, row_stride)`` such that row r, column c of ``t`` viewed as (rows, n_cols) sits at ``data_ptr +
    r * row_stride + c`` (elements): ``t`` itself when contiguous (no reshape: the launchers pass only pointers and
    strides), else :func:`rows_2d`'s view or copy."""
    if t.is_contiguous():
        return t, n_cols
    t2 = rows_2d(t, n_cols)
    return t2, t2.stride(0)


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (``get_device_properties`` costs microseconds: cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints. ``triton.cdiv`` is the same, but as a ``constexpr_function`` its wrapper costs
    microseconds per host call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n >= 1``), as ``triton.next_power_of_2`` without its wrapper's cost."""
    return 1 << (n - 1).bit_length()

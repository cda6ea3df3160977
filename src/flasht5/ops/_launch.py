"""Low-overhead launches of ``@triton.jit`` kernels, shared by every kernel file.

``kernel[grid](...)`` binds and specialises every argument in Python on each call (and, in Triton 3.6, builds a
string key and launch metadata): 19.5 us of host time per launch on the H200 machine's CPU, against 6.4 us for
calling the compiled kernel's launcher directly (measured with tiny inputs, 2026-12-01). :class:`FastKernel` keeps
the compiled kernel per *specialisation key* and calls its launcher.

The key mirrors what Triton specialises on, so a cached kernel is only reused where Triton itself would reuse it:
the current device, the constexpr values and launch options, each tensor's dtype and whether its data pointer is
16-byte aligned, and for each integer whether it is divisible by 16, equal to 1 (Triton makes a 1 a constant) and
within int32 (i32 or i64 parameter). Integers listed in the kernel's ``do_not_specialize`` are specialised by Triton
on their width only; keying them on more is merely conservative (an extra cache entry, never a wrong kernel).
Floats, bools and ``None`` are keyed on their type (Triton does not specialise their values). Integers of 2**63 and
above (Triton's u64) share the i64 key; the launcher would refuse such a value for an i64 parameter rather than
truncate it, and no flasht5 launch passes one.

The first call of each key goes through Triton's own launch, which compiles (or finds its cached binary) and
returns the compiled kernel. Triton's launch is also used for every call of a kernel that is not a plain
``JITFunction`` (under ``TRITON_INTERPRET=1`` ``triton.jit`` returns an interpreted function; autotuned or heuristic
wrappers keep their own logic) and while a Triton launch hook is installed (a profiler such as proton), so that the
hook sees every launch. Skipped relative to Triton's launch: its pre-run hooks (none are installed on these
kernels) and its check that the kernel's global variables did not change since it was compiled. Where the compiled
kernel's launcher is Triton's ``CudaLauncher`` and the kernel needs no global or profile scratch memory (every
flasht5 kernel), the cached entry is the launcher's C ``launch`` function with its fixed leading arguments, which
also skips ``CudaLauncher.__call__`` (a Python frame and two scratch-allocation closures per launch); any other
launcher is called as Triton calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

_Tensor = torch.Tensor


def _hooks_installed() -> bool:
    # Triton 3.6 keeps launch hooks in a HookChain that is never None (empty: no hook); older versions keep a
    # callable or None.
    rt = knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class FastKernel:
    """``FastKernel(jit_fn)(grid, args, consts, num_warps=..., num_stages=...)`` launches ``jit_fn`` with the runtime
    ``args`` followed by the constexpr ``consts``, both in signature order (constexprs last in the signature)."""

    def __init__(self, fn: Any):
        self.fn = fn
        self._direct = isinstance(fn, JITFunction)  # False under the interpreter (triton.jit at import decides)
        self._compiled: dict[tuple, Any] = {}

    def __call__(
        self, grid: Sequence[int], args: Sequence[Any], consts: Sequence[Any] = (), *, num_warps: int = 4,
        num_stages: int = 3,
    ) -> None:  # fmt: skip
        if not self._direct or _hooks_installed():
            self.fn[tuple(grid)](*args, *consts, num_warps=num_warps, num_stages=num_stages)
            return
        active = driver.active
        device = active.get_current_device()
        # One flat key, built inline: a helper function call per argument doubles the cost of this loop.
        key = [device, tuple(consts), num_warps, num_stages]
        for a in args:
            if type(a) is int:
                key.append((a & 15 == 0, a == 1, -0x80000000 <= a <= 0x7FFFFFFF))
            elif isinstance(a, _Tensor):
                key.append(a.dtype)
                key.append(a.data_ptr() & 15 == 0)
            else:
                key.append(type(a))
        key = tuple(key)
        entry = self._compiled.get(key)
        if entry is None:
            kernel = self.fn[tuple(grid)](*args, *consts, num_warps=num_warps, num_stages=num_stages)
            self._compiled[key] = _launch_entry(kernel)
            return
        launch, head = entry
        n = len(grid)
        launch(
            grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(device), *head, *args,
            *consts,
        )  # fmt: skip


def _launch_entry(kernel: Any) -> tuple[Any, tuple]:
    """(callable, its fixed arguments after the stream) that launches the compiled ``kernel``.

    Triton 3.6's ``CudaLauncher.__call__(gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook,
    exit_hook, *args)`` allocates the scratch buffers (none here) and calls its C ``launch(gx, gy, gz, stream,
    function, cooperative_grid, pdl, global_scratch, profile_scratch, metadata, launch_metadata, enter_hook,
    exit_hook, *args)``: that function is called directly when nothing needs scratch memory."""
    run = kernel.run
    raw = getattr(run, "launch", None)
    if (
        type(run).__name__ == "CudaLauncher"
        and raw is not None
        and not getattr(run, "global_scratch_size", 1)
        and not getattr(run, "profile_scratch_size", 1)
    ):
        head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata)
        return raw, (*head, None, None, None)
    return run, (kernel.function, kernel.packed_metadata, None, None, None)

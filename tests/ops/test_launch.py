"""ops/_launch.py: FastKernel reuses a compiled kernel exactly where Triton's specialisation would, with fakes for the
JIT function and the driver (the real fast path needs a GPU; every GPU kernel test goes through it)."""

import types

import pytest
import torch
from triton import knobs
from triton.runtime.jit import JITFunction

import flasht5.ops._launch as L


class _Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn-handle", "meta"

    def run(self, *a):
        self.log.append(("direct", a))


class _FakeJit(JITFunction):
    def __init__(self):  # no real kernel: only __getitem__ is used
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return _Compiled(self.log)

        return launch


@pytest.fixture
def fake(monkeypatch):
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 1234)
    monkeypatch.setattr(L, "driver", types.SimpleNamespace(active=active))
    jit = _FakeJit()
    return jit, L.FastKernel(jit)


def test_second_call_of_a_key_launches_directly_with_all_arguments(fake):
    jit, k = fake
    x = torch.zeros(64)
    k((3,), (x, 32, 0.5), (True, 128), num_warps=8)
    assert jit.log[-1][0] == "triton" and jit.log[-1][2] == (x, 32, 0.5, True, 128)
    assert jit.log[-1][3] == {"num_warps": 8, "num_stages": 3}
    k((5, 2), (x, 48, 0.25), (True, 128), num_warps=8)  # same specialisation: other values
    kind, args = jit.log[-1]
    assert kind == "direct"
    assert args == (5, 2, 1, 1234, "fn-handle", "meta", None, None, None, x, 48, 0.25, True, 128)


@pytest.mark.parametrize(
    "args,consts,opts",
    [
        ((torch.zeros(64), 33, 0.5), (True, 128), {}),  # 33 is not a multiple of 16
        ((torch.zeros(64), 1, 0.5), (True, 128), {}),  # Triton turns an int 1 into a constant
        ((torch.zeros(64), 2**31, 0.5), (True, 128), {}),  # i64 instead of i32
        ((torch.zeros(64, dtype=torch.float16), 32, 0.5), (True, 128), {}),  # other dtype
        ((torch.zeros(64)[1:], 32, 0.5), (True, 128), {}),  # pointer not 16-byte aligned
        ((torch.zeros(64), 32, 0.5), (False, 128), {}),  # other constexpr
        ((torch.zeros(64), 32, 0.5), (True, 128), {"num_warps": 4}),  # other launch option
    ],
)
def test_a_new_specialisation_goes_through_triton(fake, args, consts, opts):
    jit, k = fake
    k((3,), (torch.zeros(64), 32, 0.5), (True, 128), num_warps=8)
    k((3,), args, consts, **{"num_warps": 8, **opts})
    assert [e[0] for e in jit.log] == ["triton", "triton"]


def test_launch_hook_and_interpreter_take_tritons_launch(fake, monkeypatch):
    jit, k = fake
    x = torch.zeros(64)
    k((1,), (x, 32), ())
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        k((1,), (x, 32), ())
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    k((1,), (x, 32), ())
    assert [e[0] for e in jit.log] == ["triton", "triton", "direct"]
    # under TRITON_INTERPRET=1 (CPU tests) triton.jit returns an interpreted function: Triton's launch, always
    from flasht5.ops._device import interpreting
    from flasht5.ops.norm import _rms_norm_fwd_kernel

    assert L.FastKernel(_rms_norm_fwd_kernel)._direct == (not interpreting())


class CudaLauncher:  # the name FastKernel recognises: Triton 3.6's launcher class, faked
    def __init__(self, log, global_scratch=0, profile_scratch=0):
        self.log = log
        self.global_scratch_size, self.profile_scratch_size = global_scratch, profile_scratch
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def launch(self, *a):
        self.log.append(("raw", a))

    def __call__(self, *a):
        self.log.append(("launcher", a))


@pytest.mark.parametrize("scratch", [(0, 0), (256, 0), (0, 64)])
def test_cuda_launcher_is_called_through_its_c_launch_unless_it_needs_scratch(fake, monkeypatch, scratch):
    jit, k = fake
    compiled = _Compiled(jit.log)
    compiled.run = CudaLauncher(jit.log, *scratch)
    monkeypatch.setattr(_FakeJit, "__getitem__", lambda self, grid: lambda *a, **kw: compiled)
    x = torch.zeros(64)
    k((3,), (x, 32), (True,))  # compiles (here: returns the fake compiled kernel)
    k((5, 2), (x, 48), (True,))
    kind, args = jit.log[-1]
    if scratch == (0, 0):
        # launch(gx, gy, gz, stream, function, cooperative, pdl, global_scratch, profile_scratch, metadata,
        #        launch_metadata, enter_hook, exit_hook, *args, *consts)
        assert kind == "raw"
        assert args == (5, 2, 1, 1234, "fn-handle", False, True, None, None, "meta", None, None, None, x, 48, True)
    else:  # scratch memory: the launcher's own __call__ allocates it
        assert kind == "launcher"
        assert args == (5, 2, 1, 1234, "fn-handle", "meta", None, None, None, x, 48, True)

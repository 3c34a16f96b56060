import os

# OpenMP threads that sleep between parallel regions instead of spinning: on a busy machine
# (CI runners, several jobs on 2 cores) spinning helpers starve the main thread, and small
# models decoded 10-70x slower (measured with generate() on gpt-tiny). Must be set before
# torch loads the OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Tests are small: two threads is what the machine has, and keeps timings steady.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture
def run_blocks_calls(monkeypatch):
    """The new-token count (x.shape[1]) of every call of the decode kernels' run_blocks (every
    fused layer in one C++ call, decode_block.DecodeBlocks) while the test runs."""
    from scratchlm import cpu_gemv

    ops = cpu_gemv.kernels()
    if ops is None:
        pytest.skip("scratchlm's CPU kernels are not built")
    calls = []

    class Spy:  # the extension, with run_blocks noted
        def __getattr__(self, name):
            return getattr(ops, name)

        def run_blocks(self, plans, x, *args):
            calls.append(x.shape[1])
            return ops.run_blocks(plans, x, *args)
    monkeypatch.setitem(cpu_gemv._built, "module", Spy())
    return calls

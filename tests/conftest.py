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

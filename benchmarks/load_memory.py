"""Peak memory while loading a Hugging Face checkpoint: scratchlm.hf.load_hf vs the naive way.

Each loader runs in a fresh Python process; a thread samples the process's resident memory
(VmRSS, and its anonymous part RssAnon) every millisecond. The figure is the peak minus the
resident memory just before loading, divided by the bytes of the weights on disk.

    naive      safetensors.torch.load_file (every tensor) + Transformer(config) (random init,
               a second full copy) + load_state_dict (copies into it)
    load_hf    each tensor read from the file into its own buffer (safetensors_io), GPT-2's
               Conv1D transposes a few rows at a time; the model built on the meta device and
               given those tensors (assign=True) by state_dict.model_from_state_dict, the
               helper every loader uses

    python benchmarks/load_memory.py              # GPT-2 124M and a ~270M Llama, random weights
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, threading, time
import torch
from scratchlm import Transformer
from scratchlm.hf import config_from_hf, convert_hf_state_dict, load_hf

def rss():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]

path, how = sys.argv[1], sys.argv[2]
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
if how == "naive":
    from safetensors.torch import load_file
    hf_config = json.load(open(path + "/config.json"))
    state = load_file(path + "/model.safetensors")
    config = config_from_hf(hf_config)
    model = Transformer(config.replace(dtype=str(next(iter(state.values())).dtype).replace("torch.", "")))
    model.load_state_dict(convert_hf_state_dict(state, config, hf_config["model_type"]))
    del state
else:
    model, _ = load_hf(path, with_tokenizer=False)
seconds = time.perf_counter() - start
time.sleep(0.01)
running = False
thread.join()
print(json.dumps({"rss": peak[0] - base[0], "anon": peak[1] - base[1], "seconds": seconds}))
'''


def make_checkpoints(root: Path) -> dict[str, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    out = {}
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    gpt2.save_pretrained(root / "gpt2")
    out["GPT-2 124M (fp32)"] = root / "gpt2"
    del gpt2
    llama_cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                                         max_position_embeddings=2048, tie_word_embeddings=False)
    llama = transformers.LlamaForCausalLM(llama_cfg)
    llama.save_pretrained(root / "llama")
    out["Llama 16x1024 (fp32)"] = root / "llama"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", action="append", default=None,
                    help="measure these Hugging Face directories (model.safetensors) instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {Path(d).name: Path(d) for d in args.model_dir} if args.model_dir else make_checkpoints(Path(tmp))
        print(f"{'checkpoint':24s} {'weights':>9s}   {'loader':8s} {'peak RSS':>10s} {'x weights':>9s}"
              f" {'peak anon':>10s} {'x weights':>9s} {'time':>6s}")
        for name, d in dirs.items():
            size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
            for how in ("naive", "load_hf"):
                run = subprocess.run([sys.executable, "-c", CHILD, str(d), how], capture_output=True, text=True)
                if run.returncode:
                    print(run.stderr[-2000:])
                    continue
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"{name:24s} {size / 1e6:7.0f}MB   {how:8s} {r['rss'] / 1e6:8.0f}MB {r['rss'] / size:8.2f}x"
                      f" {r['anon'] / 1e6:8.0f}MB {r['anon'] / size:8.2f}x {r['seconds']:5.1f}s")


if __name__ == "__main__":
    main()

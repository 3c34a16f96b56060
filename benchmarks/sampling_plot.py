"""Draw docs/images/sampling.png: one next-token distribution under temperature, top-k,
top-p and min-p (see docs/decoding.md).

    python benchmarks/sampling_plot.py [--out docs/images/sampling.png]
"""

import argparse

import torch

from scratchlm.plots import plot_sampling


def example_logits() -> torch.Tensor:
    """A made-up but typical next-token distribution: a few likely tokens, a long tail."""
    g = torch.Generator().manual_seed(3)
    return torch.linspace(4.0, -3.0, 40) + 0.3 * torch.randn(40, generator=g)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/images/sampling.png")
    print("wrote", plot_sampling(example_logits(), ap.parse_args().out))

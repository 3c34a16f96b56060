"""The lm-evaluation-harness model ``scratchlm``: run any of its tasks on a scratchlm model.

Importing this module registers the model with lm-eval (``pip install "scratchlm[eval]"``).
lm-eval's own ``lm_eval`` command finds only the models it ships, so run it through this
module, which registers ``scratchlm`` and hands the arguments to lm-eval's command line::

    python -m scratchlm.eval.harness --model scratchlm --model_args pretrained=runs/demo/best \\
        --tasks hellaswag --batch_size 16

or from Python::

    import lm_eval, scratchlm.eval.harness
    lm_eval.simple_evaluate(model="scratchlm", model_args="pretrained=runs/demo/best", tasks=[...])

The three request types map onto scratchlm's own functions:

- ``loglikelihood``: lm-eval's ``TemplateLM`` splits (context, continuation) into tokens,
  then ``loglik.score_continuations`` scores them (batched, prefix shared through the cache);
- ``loglikelihood_rolling``: ``bpb.rolling_loglikelihood`` (the same windows as lm-eval's);
- ``generate_until``: ``scratchlm.generate.generate`` (batched, KV-cached), stopping at
  the request's ``until`` strings and end-of-text, greedy unless ``do_sample``.

Defaults follow lm-eval's ``hf`` backend, so the same model scores the same: no BOS is
added to texts (``add_bos_token=True`` to add it), the prefix token of an empty context
is BOS else end-of-text, and a request longer than the context is cut from the left.
"""

from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401 - lm-eval fills its registry lazily, only while empty: fill it first
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..errors import ScratchLMError
from .bpb import rolling_loglikelihood
from .loglik import prefix_token_id, score_continuations


@register_model("scratchlm")
class ScratchLMHarness(TemplateLM):
    """lm-eval's view of a scratchlm model (``pretrained`` is anything ``load_any`` opens)."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str = "cpu",
                 dtype: str | None = None, add_bos_token: bool = False, **_ignored):
        super().__init__()
        if model is None:
            import torch

            from . import load_model

            if pretrained is None:
                raise ScratchLMError("model_args needs pretrained=DIR (a model directory, HF directory or preset)")
            torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                           "float16": torch.float16}.get(str(dtype)) if dtype not in (None, "auto") else None
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's command line asks for cuda by default; its hf backend falls back too
            model, tokenizer = load_model(pretrained, device=device or "cpu", dtype=torch_dtype)
        if tokenizer is None:
            raise ScratchLMError("the model has no tokenizer: lm-eval tasks are text")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or model.config.context_length)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1")

    # ---- what TemplateLM needs -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eot = self.tokenizer.eot_id
        return int(eot) if eot is not None else prefix_token_id(self.tokenizer)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        bos = getattr(self.tokenizer, "bos_id", None)
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        if add and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = score_continuations(self.model, pairs, batch_size=self.batch_size, truncate=True,
                                      progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [request.args[0] for request in requests]
        totals = rolling_loglikelihood(self.model, _Encoder(self), texts, max_length=self.max_length,
                                       batch_size=self.batch_size, progress=not disable_tqdm)
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, batched: requests with the same generation
        settings go through ``generate`` together, ``batch_size`` at a time."""
        import json

        from tqdm.auto import tqdm

        from ..generate import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1] or {}, sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id])
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm, leave=False)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                # The context is cut from the left to leave room for the answer, as lm-eval does.
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in chunk]
                completions = generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new,
                                       temperature=temperature, top_p=kwargs.get("top_p") if do_sample else None,
                                       stop=[s for s in until if s], overflow="truncate")
                for i, completion in zip(chunk, completions):
                    text = completion.text
                    for stop in until:  # cut at the first stop string, as lm-eval does
                        if stop:
                            text = text.split(stop)[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


class _Encoder:
    """The adapter's tokenization (BOS rule included) with the tokenizer's ids, for rolling windows."""

    def __init__(self, lm: ScratchLMHarness):
        self.lm = lm
        self.bos_id, self.eot_id = getattr(lm.tokenizer, "bos_id", None), lm.tokenizer.eot_id

    def encode(self, text: str) -> list[int]:
        return self.lm.tok_encode(text)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with the ``scratchlm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

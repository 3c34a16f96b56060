"""Direct preference optimisation: learn from pairs (prompt, chosen, rejected) without a reward model.

    pairs file -> token ids with response masks (preference_data.py)
      -> sequence_logps: log pi(response | prompt), summed over the response's tokens
      -> preference_loss: DPO (sigmoid), robust DPO, hinge, IPO, or SimPO (no reference)
      -> DPOTask, a task of the training core (../train/core.py)
      -> OUT/latest, OUT/best: model dirs (or LoRA adapter dirs); OUT/metrics.jsonl

DPO in one line (Rafailov et al., 2023; docs/preference-tuning.md derives it). With the
implicit reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) of a response, the loss of a pair
is the Bradley-Terry model's negative log-likelihood that the chosen response wins:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

>>> import torch
>>> policy = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])      # chosen, rejected
>>> reference = torch.tensor([-10.5, -11.5]), torch.tensor([-10.5, -11.5])
>>> losses, chosen_r, rejected_r = preference_loss("sigmoid", *policy, *reference, beta=0.1)
>>> chosen_r, rejected_r                                                    # beta * log-ratio
(tensor([ 0.0500, -0.0500]), tensor([-0.0500,  0.0500]))
>>> torch.allclose(losses, -torch.nn.functional.logsigmoid(chosen_r - rejected_r))
True
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..chat import resolve_template
from ..errors import ConfigError
from ..finetune.instruct import load_base, save_tuned, tuned_model
from ..finetune.instruct_data import IGNORE_INDEX
from ..lora import adapters_disabled, count_parameters
from ..shared_prompt import can_share, continuation_hidden
from ..train.core import Task, Trainer, TrainResult, eval_mode
from ..train.distributed import is_main_process, process_group
from .config import DPOConfig
from .preference_data import RAW, collate_pairs, is_chat, load_pairs, make_pairs, pair_order, split_pairs


# ----------------------------------------------------------------------------------------
# Log-probabilities of the responses
# ----------------------------------------------------------------------------------------
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over each row's response tokens, number of those tokens).

    logits (N, T, V), targets (N, T) with -100 where a position is not in the loss (prompt,
    padding). Returns two (N,) tensors. In float32: a log-softmax over the vocabulary."""
    flat = torch.arange(targets.numel(), device=targets.device)
    return response_logps(logits.flatten(0, 1), flat, targets), (targets != IGNORE_INDEX).sum(-1)


def response_logps(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sequence_logps's sums (N,) from logits (n, V) at n positions of the targets (N, T), the
    flat index of each in ``index`` (n,) (response_logits), every other position out of the loss."""
    token_logps = -F.cross_entropy(logits.float(), targets.flatten()[index], ignore_index=IGNORE_INDEX,
                                   reduction="none")  # (n,); 0 where ignored
    # Back into the (N, T) layout (index_copy: no atomic adds, the same sums on every run).
    return token_logps.new_zeros(targets.numel()).index_copy(0, index, token_logps).view(targets.shape).sum(-1)


def response_spans(y: torch.Tensor) -> tuple[list[int], list[int]]:
    """(starts, ends) of each row's response for shared_prompt.py, from targets y (N, T) on
    the host: row i's prompt is its inputs up to its first response target (x[i, :starts[i]]),
    and ends[i] - 2 is its last response target (so every target column is computed)."""
    trainable = y != IGNORE_INDEX
    first = trainable.int().argmax(-1)
    last = y.shape[1] - 1 - trainable.flip(-1).int().argmax(-1)
    return (first + 1).tolist(), (last + 2).tolist()


def response_logits(model, x: torch.Tensor, spans: tuple[list[int], list[int]] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, V), index (n,)): the logits of ``model`` over inputs x (N, T) at n of its
    positions, and the flat index of each in (N, T). Without ``spans``: model(x), every
    position. With them (response_spans), when the model allows it (shared_prompt.can_share),
    only the positions that predict a response token, each pair's prompt run once for its two
    rows: a pair shares its prompt, so the model reads it once, and the output head runs on
    the responses only (shared_prompt.continuation_hidden)."""
    if spans is not None:
        ids = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)  # the last input of a row is never needed
        if can_share(model, ids, *spans):
            hidden, index = continuation_hidden(model, ids, *spans)
            return model.lm_head(hidden), index
    return model(x).flatten(0, 1), torch.arange(x.numel(), device=x.device)


# ----------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------
def preference_loss(loss_type: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards), each (B,). The log-probs are sums
    over each response's tokens (sequence_logps); ``*_tokens`` count them (IPO, SimPO).

    With h = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected):

        sigmoid  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)    DPO; e > 0: conservative
                 DPO (each label flipped with probability e)
        robust   (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)   an unbiased
                 estimate of the clean-label loss (Chowdhury et al., 2024)
        hinge    max(0, 1 - beta h)                                       SLiC
        ipo      (h' - 1 / (2 beta))^2, h' the log-ratios averaged per token    IPO: a squared loss
                 pulls the margin to a target instead of pushing it to infinity
        simpo    as sigmoid on beta * (avg log pi(chosen) - avg log pi(rejected)) - gamma:
                 no reference model, length-normalised (Meng et al., 2024)

    The rewards are beta * (log pi - log pi_ref), summed over the tokens (SimPO: beta * the
    mean log pi), detached: TRL's definitions, so the logged metrics compare."""
    e = label_smoothing
    if loss_type == "simpo":
        chosen_scores, rejected_scores = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens
        logits = beta * (chosen_scores - rejected_scores) - simpo_gamma
        losses = -(1 - e) * F.logsigmoid(logits) - e * F.logsigmoid(-logits)
        return losses, beta * chosen_scores.detach(), beta * rejected_scores.detach()
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        h_per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h_per_token - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"unknown preference loss {loss_type!r}: choose sigmoid, robust, hinge, ipo or simpo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_ref) of the next-token distributions, averaged over the response positions
    (targets != -100): at each position the exact sum over the vocabulary, no sampling.
    logits, ref_logits (N, T, V), targets (N, T) (or (n, V) and (n,): any positions); detached,
    in float32; no host sync (a masked mean)."""
    logp, logq = logits.detach().float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    per_position = (logp.exp() * (logp - logq)).sum(-1)  # (N, T) or (n,)
    mask = (targets != IGNORE_INDEX).float()
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """What a step logs (tensors: the core syncs them only when it writes a row):
    reward_accuracy (the share of pairs whose chosen response has the higher reward), the
    mean rewards and their margin, and the mean log-probs of the responses."""
    B = chosen_rewards.shape[0]
    return {"reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "chosen_logp": logps[:B].detach().mean(), "rejected_logp": logps[B:].detach().mean()}


def dpo_loss(model, x: torch.Tensor, y: torch.Tensor, ref_logps: torch.Tensor | None, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             ref_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
             spans: tuple[list[int], list[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, metrics) of one batch of pairs: one forward of ``model`` over its 2B rows
    (x, y from collate_pairs: the B chosen rows, then the B rejected), ``ref_logps`` (2B,) the
    reference model's log-probs of the same rows (None for SimPO). With the reference's
    ``ref_logits`` (response_logits: logits and their index) the metrics include ``kl``, the
    token-level KL(pi || pi_ref) (token_kl). ``spans`` (response_spans(y)): each pair's
    prompt runs once, and the output head only on the responses (response_logits)."""
    logits, index = response_logits(model, x, spans)
    logps, tokens = response_logps(logits, index, y), (y != IGNORE_INDEX).sum(-1)
    B = x.shape[0] // 2
    refs = (ref_logps[:B], ref_logps[B:]) if ref_logps is not None else (None, None)
    losses, chosen_r, rejected_r = preference_loss(loss_type, logps[:B], logps[B:], *refs, tokens[:B], tokens[B:],
                                                   beta=beta, label_smoothing=label_smoothing,
                                                   simpo_gamma=simpo_gamma)
    metrics = pair_metrics(chosen_r, rejected_r, logps)
    if ref_logits is not None:
        ref_logits, ref_index = ref_logits
        # The same positions on both sides: where one model gave every position (a wrapped
        # policy, the plain forward) and the other only the responses, the responses' rows.
        if len(index) > len(ref_index):
            logits, index = logits.detach()[ref_index], ref_index
        elif len(ref_index) > len(index):
            ref_logits = ref_logits[index]
        metrics["kl"] = token_kl(logits, ref_logits, y.flatten()[index])
    return losses.mean(), metrics


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout of ``model`` (its nn.Dropout modules, the adapters' included, and the
    attention's dropout rate) set to 0, in place; the saved config keeps its value. DPO
    compares the policy's log-probs with the reference's, which runs without dropout: with
    it on, the rewards would be noise even at step 0 (TRL's ``disable_dropout``, on by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model


# ----------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------
class DPOTask(Task):
    """Preference tuning as a task of the training core. A batch is (x, y, ref_logps): the
    2B rows of B pairs (chosen first) and, with --precompute-ref, their reference log-probs."""

    title = "preference tuning"
    best_metric, best_mode = "val_loss", "min"

    def __init__(self, cfg: DPOConfig, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        torch.manual_seed(cfg.seed)  # a preset name builds random weights
        self.base, self.tokenizer = load_base(cfg.model)
        pairs = load_pairs(cfg.data)
        if cfg.val_data:
            train_pairs, val_pairs = pairs, load_pairs(cfg.val_data)
        else:
            train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
        self.template = self._template(pairs)
        max_length = self.base.config.context_length + 1  # inputs and targets are one shorter
        self.train_pairs, self.cut = make_pairs(train_pairs, self.tokenizer, self.template, max_length, str(cfg.data))
        self.val_pairs = make_pairs(val_pairs, self.tokenizer, self.template, max_length,
                                    str(cfg.val_data or cfg.data))[0] if val_pairs else []
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        self.n_batches = (len(self.train_pairs) + cfg.batch_size - 1) // cfg.batch_size
        self.lora = cfg.lora_config()
        self.reference: torch.nn.Module | None = None  # a frozen copy (full fine-tuning, live reference)
        self.ref_train: torch.Tensor | None = None  # precomputed: (n, 2) reference log-probs, chosen and rejected
        self.ref_val: torch.Tensor | None = None

    def _template(self, pairs: list[dict]) -> str:
        cfg = self.cfg
        if cfg.template == RAW:
            if any(is_chat(p) for p in pairs):
                raise ConfigError("--template raw takes text prompts; the data has chat messages")
            return RAW
        model_dir = cfg.model if Path(cfg.model).is_dir() else None
        records = [{"messages": p["prompt"]} for p in pairs if is_chat(p)]
        records = [{"messages": r["messages"] + [{"role": "assistant", "content": ""}]} for r in records]
        return resolve_template(None if cfg.template == "auto" else cfg.template, self.tokenizer, model_dir,
                                training=True, records=records)

    def setup(self, run) -> None:
        super().setup(run)
        if run.sharded:
            raise ConfigError("preference tuning runs a reference model beside the policy: use --distributed ddp")

    # ---- the policy and the reference ---------------------------------------------------------
    def model(self, resume_from: Path | None) -> torch.nn.Module:
        cfg, device = self.cfg, self.run.device
        self.net = tuned_model(self.base, self.lora, resume_from)
        # With LoRA the reference is this model with its adapters off: no copy. Else the starting
        # weights, frozen (precomputed: used once, before training).
        if self.lora is None and cfg.needs_reference:
            self.reference = self.base if cfg.precompute_ref else copy.deepcopy(self.base).requires_grad_(False)
            self.reference.to(device)
        if cfg.disable_dropout:
            disable_dropout(self.net)
        if cfg.needs_reference and cfg.precompute_ref:
            self.net.to(device)
            self.ref_train = self._reference_table(self.train_pairs)
            self.ref_val = self._reference_table(self.val_pairs)
            self.reference = None  # no longer needed: one model in memory from here on
            if self.net is not self.base:
                del self.base
        trainable, total = count_parameters(self.net)
        if not self.quiet and is_main_process():
            ref = ("none" if not cfg.needs_reference else "adapters off" if self.lora else "a frozen copy") + (
                ", precomputed" if cfg.needs_reference and cfg.precompute_ref else "")
            print(f"{len(self.train_pairs)} training pairs, {len(self.val_pairs)} validation; template "
                  f"{self.template}; loss {cfg.loss} (beta {cfg.beta}); reference: {ref}; training {trainable:,} "
                  f"of {total:,} parameters" + (f"; {self.cut} pairs cut to fit" if self.cut else ""))
        return self.net

    @torch.inference_mode()
    def reference_logits(self, x: torch.Tensor, spans=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's logits and their index (response_logits): the frozen copy, or
        with LoRA the model itself with its adapters switched off; in eval mode (no dropout),
        in inference mode (no autograd bookkeeping: nothing here is ever differentiated)."""
        if self.reference is not None:
            with eval_mode(self.reference):
                return response_logits(self.reference, x, spans)
        with adapters_disabled(self.net), eval_mode(self.net):
            return response_logits(self.net, x, spans)

    def reference_logps(self, x: torch.Tensor, y: torch.Tensor, spans=None) -> torch.Tensor:
        """log pi_ref of each row's response, (2B,)."""
        return response_logps(*self.reference_logits(x, spans), y)

    def _reference_table(self, pairs) -> torch.Tensor:
        """(n, 2) reference log-probs of every pair, chosen and rejected, computed once."""
        table, B, device = [], self.cfg.batch_size, self.run.device
        for start in range(0, len(pairs), B):
            x, y = collate_pairs(pairs[start:start + B], self.pad_id)
            with self.run.autocast():
                logps = self.reference_logps(x.to(device), y.to(device), response_spans(y))
            table.append(logps.view(2, -1).T)
        return torch.cat(table) if table else torch.zeros(0, 2, device=device)

    # ---- batches and the loss -----------------------------------------------------------------
    def batches_per_epoch(self) -> int:
        return self.n_batches

    def micro_batch(self, step, micro, rank, world, model):
        # The g-th micro-batch of the run: epochs of shuffled pairs, each rank its own share.
        g = (step * self.cfg.grad_accum + micro) * world + rank
        epoch, index = divmod(g, self.n_batches)
        order = pair_order(len(self.train_pairs), self.cfg.seed, epoch)
        chosen = order[index * self.cfg.batch_size:(index + 1) * self.cfg.batch_size]
        x, y = collate_pairs([self.train_pairs[i] for i in chosen], self.pad_id)
        ref = None if self.ref_train is None else self.ref_train[chosen].T.reshape(-1)  # (2B,): chosen, rejected
        return x, y, ref, response_spans(y)  # the spans on the host, before the batch moves

    def pair_loss(self, model, x, y, ref, spans=None):
        """(mean loss, metrics) of a batch of pairs; the reference runs here (and gives the
        KL metric) unless its log-probs were precomputed."""
        cfg, ref_logits = self.cfg, None
        if cfg.needs_reference and ref is None:
            ref_logits = self.reference_logits(x, spans)
            ref = response_logps(*ref_logits, y)  # outside inference mode: a plain tensor
        return dpo_loss(model, x, y, ref if cfg.needs_reference else None, cfg.loss, cfg.beta, cfg.label_smoothing,
                        cfg.simpo_gamma, ref_logits=ref_logits, spans=spans)

    def loss(self, model, batch):
        x, y, ref, spans = batch
        loss, metrics = self.pair_loss(model, x, y, ref, spans)
        return loss, metrics, x.numel()

    def evaluate(self, model) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        device, B = self.run.device, self.cfg.batch_size
        sums, n = {}, 0
        for start in range(0, len(self.val_pairs), B):
            x, y = collate_pairs(self.val_pairs[start:start + B], self.pad_id)
            ref = None if self.ref_val is None else self.ref_val[start:start + B].T.reshape(-1)
            loss, metrics = self.pair_loss(model, x.to(device), y.to(device), ref, response_spans(y))
            k = x.shape[0] // 2
            for name, value in {"loss": loss, **metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.double() * k  # a mean over pairs
            n += k
        return {f"val_{name}": (value / n).item() for name, value in sums.items()}

    def save(self, directory, weights, extra) -> None:
        save_tuned(directory, self.net, self.tokenizer, self.template, self.lora, str(self.cfg.model), weights, extra)


def dpo(cfg: DPOConfig, quiet: bool = False) -> TrainResult:
    """Run `scratchlm posttrain dpo` as ``cfg`` says."""
    with process_group():
        return Trainer(cfg, DPOTask(cfg, quiet), quiet=quiet).run()


def train_dpo(model: str | os.PathLike, data: str | os.PathLike, out_dir: str = "runs/dpo", quiet: bool = False,
              **options) -> TrainResult:
    """Preference-tune ``model`` on the pairs in ``data``; ``options`` are DPOConfig fields
    (loss, beta, lora, precompute_ref, max_steps, lr, val_data, ...)."""
    cfg = DPOConfig.from_dict(dict(model=str(model), data=str(data), out_dir=str(out_dir), **options))
    return dpo(cfg, quiet=quiet)


__all__ = ["sequence_logps", "response_logps", "response_spans", "response_logits", "preference_loss", "pair_metrics", "token_kl", "dpo_loss", "disable_dropout", "DPOTask", "dpo", "train_dpo"]

"""What the router losses need to know about the whole optimizer step, across micro-batches and ranks.

A step is `gradient_accumulation_steps` micro-batches on each of `world` ranks. The LM loss is
normalised by the step's target tokens (the Trainer counts them: `num_items_in_batch`); the
z-loss and the balancing loss's P are normalised the same way, by the step's real tokens,
counted here before the step's first forward. Each micro-batch then adds its share, and the
sum over micro-batches and ranks equals the loss of one big batch, however unevenly tokens
(padding, ignored labels) are spread.

The balancing loss's f comes from expert counts:
- `global`: running counts of the step's micro-batches so far, summed over ranks (one
  all-reduce per micro-batch; the first micro-batch is balanced against itself alone);
- `global_prev`: the previous step's counts over all its micro-batches and ranks (one
  all-reduce per step). f is then the same for every micro-batch of a step, so the balancing
  loss of an accumulated, multi-rank step equals one big batch's exactly; the first step has
  no previous counts and uses uniform f, whose balancing gradient is zero;
- `micro`: the micro-batch's own counts.

With loss-free balancing (training/loss_free.py) the routers choose with a selection bias: the counts
are those of the biased choice, and `end_step` returns the step's counts over all its micro-batches
and ranks, whatever the mode, for the bias update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from router_tune.losses.balancing import all_reduce_counts, selection_counts

REDUCE_MODES = ("global", "global_prev", "micro")


def routing_mask(batch: dict) -> torch.Tensor | None:
    """1 for tokens that are routed for real: `token_mask` of packed blocks, else `attention_mask`."""
    mask = batch.get("token_mask")
    return mask if mask is not None else batch.get("attention_mask")


def real_tokens(batch: dict) -> torch.Tensor:
    mask = routing_mask(batch)
    return (mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel())).float()


class GlobalBatch:
    """Per-step token count and expert counts for the balancing and z losses (see module doc)."""

    def __init__(self, reduce: str, top_k: int, across_ranks: bool, step_counts: bool = False):
        if reduce not in REDUCE_MODES:
            raise ValueError(f"aux_loss_reduce must be one of {REDUCE_MODES}, got {reduce!r}")
        self.reduce, self.top_k, self.across_ranks = reduce, top_k, across_ranks
        self.step_counts = step_counts  # end_step returns the step's counts (loss-free balancing)
        self.tokens: torch.Tensor | None = None  # real tokens of the current step, all ranks
        self.running: torch.Tensor | None = None  # `global`: counts of this step so far, all ranks
        self.local: torch.Tensor | None = None  # `global_prev`: this step's counts on this rank
        self.previous: torch.Tensor | None = None  # `global_prev`: last step's counts, all ranks

    def begin_step(self, batch_samples: list[dict], device) -> None:
        """Count the step's real tokens (a collective when counting across ranks)."""
        tokens = sum((real_tokens(b) for b in batch_samples), torch.zeros(())).to(device)
        if self.across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        self.tokens = tokens
        self.running = None

    def counts_for(self, router_logits, mask, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """The counts f is computed from for this micro-batch (None: the micro-batch's own). `bias`: the
        selection bias [L, E] the routers chose with (loss-free balancing)."""
        if self.reduce == "micro" and not self.step_counts:
            return None
        counts = selection_counts(router_logits, self.top_k, mask, bias)
        if self.reduce == "micro":
            self.local = counts if self.local is None else self.local + counts
            return counts
        if self.reduce == "global":
            counts = all_reduce_counts(counts)
            self.running = counts if self.running is None else self.running + counts
            return self.running
        self.local = counts if self.local is None else self.local + counts
        if self.previous is None:
            return torch.ones_like(counts)  # uniform f: balancing gradient zero until counts exist
        return self.previous.to(counts.device)

    def end_step(self) -> torch.Tensor | None:
        """At the optimizer step (every rank): this step's counts become the previous ones. Returns the
        step's counts over all micro-batches and ranks when built with `step_counts` (else None)."""
        if self.reduce == "global_prev" and self.local is not None:
            self.previous = all_reduce_counts(self.local)
            self.local = None
            return self.previous if self.step_counts else None
        if not self.step_counts:
            return None
        if self.reduce == "global":
            return self.running
        counts, self.local = self.local, None
        return all_reduce_counts(counts) if counts is not None else None

    def state(self) -> list | None:
        """What a checkpoint must keep for an exact resume (`global_prev`: the counts of the last step)."""
        return self.previous.cpu().tolist() if self.previous is not None else None

    def load_state(self, previous: list | None, device) -> None:
        self.previous = torch.tensor(previous, device=device) if previous is not None else None

"""OFS-DPO: a fast and a slow LoRA adapter over one frozen model, chasing each other.

Online Fast-Slow chasing DPO (Qi et al. 2024, "Online DPO: Online Direct Preference
Optimization with Fast-Slow Chasing", arXiv 2406.05534), with the `ofs_dpo:` section
(config.OFS_KEYS):
  - two identical LoRA adapters (peft) share the frozen model: "fast" trains at the
    stage's lr, "slow" at lr / lr_ratio (two optimizer parameter groups, one schedule);
  - each is trained on the configured pairwise loss against the reference, the model
    under the adapters (adapters off, as TRL's LoRA DPO): before any step both adapters
    are zero, so that is the policy the stage starts from (the SFT policy after SFT);
  - the fast adapter's loss adds reg_weight times the regulariser on the gap between the
    two adapters' preference log-odds, per pair
        -log sigmoid(beta (h_fast - h_slow)),  h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)
    (the reference cancels: h_fast - h_slow = log pi_f(y_w)/pi_s(y_w) - log pi_f(y_l)/pi_s(y_l)). It is
    DPO's loss of the fast adapter with the slow one as its reference: its gradient scales with
    sigmoid(-beta (h_fast - h_slow)), which stays away from 0 while the slow adapter keeps up, where
    DPO's own sigmoid(-beta h) vanishes as h grows (the paper's argument for it). The slow adapter's
    log-probs enter it detached: the regulariser moves the fast adapter only, the slow one learns
    from its own loss at its lower rate and is what the fast one must stay ahead of;
  - swap: after a step whose loss (the configured one, over the whole step) of the slow adapter
    is below the fast one's, the two exchange weights and AdamW moments, so the adapter ahead is
    always the one that learns fast.
Between steps the fast adapter is the active one: the policy that online rounds sample from,
that evaluation's win rates sample and that the TRL-style metrics (rewards/...) describe; the
slow adapter's are ofs/slow_margin and ofs/slow_accuracy. The paper's method section was not
at hand here: the regulariser's form, which adapter it moves and the swap rule are our reading
of its summary ("minimizing the preference probability gap between modules").

The adapters (adapters.py) exist from the model's build (model.build), so checkpoints, resumed runs and the
online loop's reference copies all have one structure; an SFT stage trains the frozen model's
own weights with the adapters frozen at zero (train_base), then train_adapters. One process only.
"""
from __future__ import annotations

import torch

from . import config as C
from . import distributed
from . import model as M
from .adapters import ADAPTERS, activate, adapters_off, swap_adapters


class BaseLM(M.FusedLM):
    """The reference of both adapters: the policy's own model with its adapters off (no copy)."""

    def forward(self, batch, fn):
        with adapters_off(self.model):
            return super().forward(batch, fn)


# ----------------------------------------------------------------------------- the objective

def regulariser(fast_chosen, fast_rejected, slow_chosen, slow_rejected, beta: float) -> torch.Tensor:
    """Per pair -log sigmoid(beta (h_fast - h_slow)) from the adapters' summed log-probs (module docstring)."""
    gap = beta * ((fast_chosen - slow_chosen) - (fast_rejected - slow_rejected))
    return torch.nn.functional.softplus(-gap)


class _KeepLogps:
    """The policy lm as the inner objective calls it, also keeping every sequence's summed log-probs [S]
    from the same forward (the hidden states once; the head's log-probs once more, fused)."""

    def __init__(self, lm, loss_impl: str, ld_alpha, grad: bool):
        self.lm, self.loss_impl, self.ld_alpha, self.grad = lm, loss_impl, ld_alpha, grad
        self.logps = None

    def __call__(self, batch, fn):
        def both(hidden, head):
            with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
                token = M.head_logprobs(hidden, head, batch.targets, self.loss_impl)
                self.logps = M.sequence_sums(token, batch, M.ld_token_weights(batch, self.ld_alpha))[0]
            return fn(hidden, head)
        return self.lm(batch, both)


class FastSlowObjective:
    """A pairwise objective (objectives.PreferenceObjective) run once per adapter, plus the regulariser.

    The step's loss is loss_fast + loss_slow + reg_weight * regulariser, each summed over the pairs
    and normalised like the inner objective's; the adapters' parameters are disjoint, so each gets
    the gradient of its own terms. Logged: the inner objective's metrics of the fast adapter, and
    ofs/fast_loss, ofs/slow_loss, ofs/regulariser, ofs/reward_gap (beta (h_fast - h_slow)),
    ofs/slow_margin, ofs/slow_accuracy (means over the pairs) and, on training steps, ofs/swaps
    (swaps so far, this step's included)."""

    def __init__(self, inner, config, model):
        options = C.ofs_options(config)
        self.inner, self.model = inner, model
        self.beta, self.reg_weight, self.swap = config.beta, options["reg_weight"], options["swap"]
        self.loss_impl, self.ld_alpha = config.loss_impl, config.ld_alpha
        self.step_losses = dict.fromkeys(ADAPTERS, 0.0)
        self.training, self.swap_due, self.swaps = False, False, 0

    @property
    def reference(self):
        return self.inner.reference

    @reference.setter
    def reference(self, reference):  # the online loop sets each round's
        self.inner.reference = reference

    def prepare(self, lm, batches):
        return self.inner.prepare(lm, batches)

    def __call__(self, lm, batch, totals, ref):
        """The step's summed loss of the micro-batch; the slow adapter's part is differentiated here, before
        the fast pass runs: one adapter's activations are alive at a time, and a layer recomputed in backward
        (gradient checkpointing) runs with the adapter that ran it. The returned loss differentiates into
        the fast adapter (run_batches' backward, over the same normaliser)."""
        activate(self.model, "slow")
        keep = _KeepLogps(lm, self.loss_impl, self.ld_alpha, grad=False)
        slow_loss, slow_metrics = self.inner(keep, batch, totals, ref)
        slow = keep.logps
        if slow_loss.requires_grad:
            with torch.autocast(batch.input_ids.device.type, enabled=False):  # run_batches' backward is outside too
                (slow_loss / totals["normaliser"]).backward()
        activate(self.model, "fast")  # and it stays active between steps
        keep = _KeepLogps(lm, self.loss_impl, self.ld_alpha, grad=True)
        fast_loss, metrics = self.inner(keep, batch, totals, ref)
        fast, pairs = keep.logps, batch.num_examples
        penalties = regulariser(fast[:pairs], fast[pairs:], slow[:pairs], slow[pairs:], self.beta)
        gap = self.beta * ((fast[:pairs] - slow[:pairs]) - (fast[pairs:] - slow[pairs:]))
        fast_loss_value, slow_loss_value = float(fast_loss.detach()), float(slow_loss.detach())
        self.step_losses["fast"] += fast_loss_value
        self.step_losses["slow"] += slow_loss_value
        metrics.update({"ofs/fast_loss": fast_loss_value, "ofs/slow_loss": slow_loss_value,
                        "ofs/regulariser": float(penalties.detach().sum()), "ofs/reward_gap": float(gap.detach().sum()),
                        "ofs/slow_margin": slow_metrics["rewards/margins"],
                        "ofs/slow_accuracy": slow_metrics["rewards/accuracies"]})
        return fast_loss + self.reg_weight * penalties.sum() + slow_loss.detach(), metrics

    def end_step(self, training: bool) -> None:
        losses, self.step_losses = distributed.all_reduce_sums(self.step_losses), dict.fromkeys(ADAPTERS, 0.0)
        self.training = training
        self.swap_due = training and self.swap and losses["slow"] < losses["fast"]

    def finish(self, sums, totals):
        record = self.inner.finish(sums, totals)
        if self.training:
            record["ofs/swaps"] = self.swaps + self.swap_due
        return record

    def after_step(self, optimizer) -> None:
        """After the optimizer's step: the swap this step's losses called for."""
        if self.swap_due:
            swap_adapters(self.model, optimizer)
            self.swaps += 1
            self.swap_due = False

    def state_dict(self) -> dict:
        return {"swaps": self.swaps}

    def load_state_dict(self, state: dict) -> None:
        self.swaps = state["swaps"]

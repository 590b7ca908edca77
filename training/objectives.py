"""The preference and SFT objectives the training loop runs (loop.run_batches drives them).

An objective is used in three calls per optimizer step (see loop.run_batches):
  prepare(lm, batches) -> (totals, extras): without gradients, the step's sums (the
      normaliser and whatever else must be global, e.g. tokens for the NLL term) and
      per-micro-batch inputs such as reference log-probs; totals are then summed over ranks;
  objective(lm, batch, totals, extra) -> (summed loss, summed metrics) of one micro-batch;
  finish(sums, totals) -> the step's record (means), after sums are summed over ranks.
Dividing every micro-batch's summed loss by the global normaliser makes accumulation
and data parallelism exact: 4 micro-batches of 1 give the gradient of one batch of 4.
"""
from __future__ import annotations

from collections import defaultdict

import torch

import prefops
from prefops import ListwiseLoss, PreferenceLoss
from prefops import reference as reference_ops
from prefops.losses import BCOLoss, kto_loss, pairwise_loss, wpo_weights
from prefops.losses.listwise import PAIR_BASED, listwise_loss, preference_matrix

from . import config as C
from . import data as D
from . import distributed
from . import model as M


def _chosen_tokens(batch: D.Batch) -> int:
    return batch.completion(0).num_targets


class SFTObjective:
    """Summed NLL of the completion tokens, over the step's completion tokens."""

    def __init__(self, loss_impl: str):
        self.loss_impl = loss_impl

    def prepare(self, lm, batches):
        return {"normaliser": sum(batch.num_targets for batch in batches)}, [None] * len(batches)

    def __call__(self, lm, batch, totals, extra):
        return lm(batch, lambda hidden, head: -M.total(M.head_logprobs(hidden, head, batch.targets, self.loss_impl),
                                                      batch)), {}

    def finish(self, sums, totals):
        return {"loss": sums["loss"] / totals["normaliser"]}


class PreferenceObjective:
    """A pairwise loss (or a weighted list of them), over the step's pairs.

    loss_impl fused: prefops.PreferenceLoss from hidden states and the head weight.
    loss_impl reference: materialised logits, then the same prefops.losses.pairwise_loss.
    Per-pair values of the rows (data.PAIR_FIELDS, batch.preference_probs, pair_weights,
    margins) go to the loss; one that no chosen loss reads is refused (_check_rows).
    """

    METRIC_TOTALS: dict = {}  # metric -> the count (a key of counts()) it is a mean over; default the pairs
    # The pairwise losses that read preference_probs: the label-smoothed ones (ε = 1 - p per pair) and SPPO.
    SOFT_LABEL_LOSSES = ("sigmoid", "simpo", "alphapo", "cpo", "sppo")

    def __init__(self, config, reference):
        self.config = config
        # batch -> (ref_chosen_logps, ref_rejected_logps), (None, None), or for the token-level
        # losses (ref_hidden, ref_head): see references.
        self.reference = reference
        self.token_level = C.is_token_level(config)

    def prepare(self, lm, batches):
        for batch in batches:
            self._check_rows(batch)
        totals = {"normaliser": sum(batch.num_examples for batch in batches),
                  "chosen_tokens": sum(map(_chosen_tokens, batches))}
        return totals, [self.reference(batch) for batch in batches]

    def _check_rows(self, batch) -> None:
        """Refuse a per-pair field of the rows that the loss would not read, and a loss without the field it reads.

        Every batch of a dataset carries the same fields (data.check_pair_fields), so the first step refuses.
        """
        config, names = self.config, C.loss_types(self.config)
        if batch.preference_probs is not None:
            if not set(names) & set(self.SOFT_LABEL_LOSSES):
                raise ValueError(f"the rows carry 'preference_prob', which loss_type {config.loss_type!r} does not "
                                 f"read; the losses with soft labels are {', '.join(self.SOFT_LABEL_LOSSES)}")
            if config.label_smoothing:
                raise ValueError("the rows carry 'preference_prob', each pair's own label_smoothing (1 - p): "
                                 f"set label_smoothing to 0; got {config.label_smoothing}")
        elif "sppo" in names:
            raise ValueError("loss_type 'sppo' reads each pair's 'preference_prob': give every row one "
                             "(sppo_hard takes hard labels)")
        if batch.pair_weights is not None:
            if config.wpo:
                raise ValueError("the rows carry 'weight' and wpo is on; the fused loss would replace the rows' "
                                 "weights by WPO's: set wpo to false or drop the rows' weights")
            coupled = sorted(set(names) & set(C.BATCH_COUPLED_LOSSES))
            if coupled:
                raise ValueError(f"the rows carry 'weight', which loss_type {coupled[0]!r} cannot take: "
                                 "it sorts the pairs of a batch")
        if batch.margins is not None:
            if "modpo" not in names:
                raise ValueError(f"the rows carry 'margin', which only loss_type 'modpo' reads; "
                                 f"got {config.loss_type!r}")
            weights = config.loss_params.get("modpo_weights")
            if not isinstance(weights, (list, tuple)) or len(weights) != 2:
                raise ValueError("a row's 'margin' is the reward margin of one other objective: set "
                                 f"loss_params.modpo_weights to [w_0, w_1]; got {weights!r}")
        elif "modpo" in names:
            raise ValueError("loss_type 'modpo' reads each pair's reward margin of the other objective: "
                             "give every row a 'margin'")

    @staticmethod
    def _row_params(batch) -> dict:
        """The rows' per-pair values as pairwise_loss arguments."""
        params = {"preference_probs": batch.preference_probs, "pair_weights": batch.pair_weights}
        if batch.margins is not None:
            # MODPO subtracts w_1 (R_w - R_l) from β δ: only the difference of the other objective's rewards
            # enters, and a row's margin is that difference, so R_w = margin and R_l = 0.
            params.update(chosen_margin_rewards=batch.margins, rejected_margin_rewards=torch.zeros_like(batch.margins))
        return {name: value for name, value in params.items() if value is not None}

    def nll_mean_length(self, totals) -> float:
        """The NLL term's mean chosen length, over the whole step (not one micro-batch)."""
        return totals["chosen_tokens"] / totals["normaliser"]

    def __call__(self, lm, batch, totals, ref):
        mean_length = self.nll_mean_length(totals)
        loss_fn = self._fused if self.config.loss_impl == "fused" else self._reference
        measure = not torch.is_grad_enabled()  # evaluation: a training step never pays for eval_metrics

        def forward(hidden, head):
            loss, metrics = loss_fn(hidden, head, batch, ref, mean_length)
            return loss, ({**metrics, **self.eval_metrics(hidden, head, batch, ref)} if measure else metrics)
        loss, metrics = lm(batch, forward)
        counts = self.counts(batch)
        # Metrics are means over this micro-batch's pairs (or lists, ordered pairs, responses: METRIC_TOTALS);
        # weighted by those counts they sum to the step's.
        return loss, {name: float(value) * counts[self.METRIC_TOTALS.get(name, "normaliser")]
                      for name, value in metrics.items() if not name.startswith("num_tokens/")}

    def counts(self, batch) -> dict:
        return {"normaliser": batch.num_examples}

    def finish(self, sums, totals):
        return {name: value / totals[self.METRIC_TOTALS.get(name, "normaliser")] for name, value in sums.items()}

    def eval_metrics(self, hidden, head, batch, ref) -> dict:
        """What evaluation adds (means over the pairs, from one more pass over the vocabulary):

        logps/accuracies: the ranking accuracy 1[log pi(y_w|x) > log pi(y_l|x)] of summed log-probs;
        logps/idealised_accuracies: that of the optimum pi* ~ pi_ref exp(r / beta) of the KL-regularised
            objective whose Bradley-Terry reward gives the pair probability p (Chen et al. 2024, "Preference
            Learning Algorithms Do Not Learn Preference Rankings"): 1[log pi_ref(y_w) - log pi_ref(y_l)
            + logit(p) / beta > 0], p the row's preference_prob, else 1 - label_smoothing (cDPO's flip rate).
            Left out with hard labels (p = 1 ranks every pair right), without a reference, and with ld_alpha
            (its reference sums are length-weighted, not those the optimum ranks by);
        diagnostics/entropy, diagnostics/top_k_entropy, diagnostics/top_k_mass: prefops.linear_diagnostics
            (k = 10, renormalised top-k entropy) averaged over each chosen completion's tokens.
        """
        config, pairs = self.config, batch.num_examples
        hidden, weight, bias = head.cast(hidden)
        diagnostics = prefops.linear_diagnostics(
            hidden, weight, batch.targets, bias=bias, ignore_index=D.IGNORE_INDEX, temperature=head.temperature,
            softcap=head.softcap, top_k=min(10, weight.shape[0]))
        logps = M.sequence_sums(diagnostics.logp, batch)[0]
        metrics = {"logps/accuracies": (logps[:pairs] > logps[pairs:]).float().mean()}
        for name in ("entropy", "top_k_entropy", "top_k_mass"):
            sums, counts = M.sequence_sums(getattr(diagnostics, name), batch)
            metrics[f"diagnostics/{name}"] = (sums[:pairs] / counts[:pairs]).mean()
        probs = batch.preference_probs
        if probs is None and config.label_smoothing:
            probs = torch.full((pairs,), 1 - config.label_smoothing, device=logps.device)
        if self.token_level:  # the reference's hidden states and head: its log-probs from them
            ref_sums = M.sequence_sums(M.head_logprobs(*ref, batch.targets, config.loss_impl), batch)[0]
            ref = ref_sums[:pairs], ref_sums[pairs:]
        if probs is not None and ref[0] is not None and config.ld_alpha is None:
            optimum = ref[0].double() - ref[1].double() + torch.logit(probs.double()) / config.beta
            metrics["logps/idealised_accuracies"] = (optimum > 0).float().mean()
        return metrics

    def _fused(self, hidden, head, batch, ref, mean_length):
        config = self.config
        hidden, weight, bias = head.cast(hidden)
        loss_fn = PreferenceLoss(
            config.loss_type, config.beta, label_smoothing=config.label_smoothing, loss_weights=config.loss_weights,
            ld_alpha=config.ld_alpha, wpo=config.wpo, kl_direction=config.kl_direction, ignore_index=D.IGNORE_INDEX,
            temperature=head.temperature, softcap=head.softcap, strategy=config.strategy, budget=config.budget,
            sequence_group=M.sequence_group(batch), nll_mean_length=mean_length,
            **{**config.loss_params, **self._row_params(batch)})
        if self.token_level:
            ref_hidden, ref_weight, ref_bias = ref[1].cast(ref[0])
            reference = dict(ref_hidden=ref_hidden.to(hidden.dtype), ref_weight=ref_weight.to(hidden.dtype),
                             ref_bias=None if ref_bias is None else ref_bias.to(hidden.dtype))
        else:
            reference = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1])
        loss, metrics = loss_fn(hidden, weight, batch.targets, bias=bias,
                                seq_ids=batch.seq_ids if batch.packed else None,
                                **reference)
        return loss * batch.num_examples, metrics

    def _reference(self, hidden, head, batch, ref, mean_length):
        config = self.config
        hidden, weight, bias = head.cast(hidden)
        options = dict(bias=bias, ignore_index=D.IGNORE_INDEX, temperature=head.temperature, softcap=head.softcap)
        params = {**config.loss_params, "nll_mean_length": mean_length, **self._row_params(batch)}
        pairs = batch.num_examples
        if self.token_level:  # TDPO: per-token KL and both models' log-probs from materialised logits
            ref_hidden, ref_weight, ref_bias = ref[1].cast(ref[0])
            kl, token, ref_token = reference_ops.linear_token_kl(
                hidden, weight, ref_hidden.to(hidden.dtype), ref_weight.to(hidden.dtype), direction=config.kl_direction,
                ref_bias=None if ref_bias is None else ref_bias.to(hidden.dtype), targets=batch.targets, **options)
            kl_sums = M.sequence_sums(kl, batch)[0]
            params.update(chosen_seq_kl=kl_sums[:pairs], rejected_seq_kl=kl_sums[pairs:])
            ref_sums = M.sequence_sums(ref_token, batch)[0]
            ref = ref_sums[:pairs], ref_sums[pairs:]
        else:
            token = reference_ops.linear_logprobs(hidden, weight, batch.targets, **options)
        sums, counts = M.sequence_sums(token, batch, M.ld_token_weights(batch, config.ld_alpha))
        if config.wpo:
            with torch.no_grad():  # over every completion token, unweighted, as the fused path's
                log_sum_p2 = reference_ops.token_sum_p2(hidden, weight, batch.targets, **options).clamp_min(
                    torch.finfo(torch.float32).tiny).log()
                logps, lengths = M.sequence_sums(token, batch)
                on_policy = wpo_weights(logps, M.sequence_sums(log_sum_p2, batch)[0], lengths)
            params["pair_weights"] = on_policy[:pairs] * on_policy[pairs:]
        losses, metrics = pairwise_loss(
            sums[:pairs], sums[pairs:], *ref, loss_type=config.loss_type, beta=config.beta,
            label_smoothing=config.label_smoothing, loss_weights=config.loss_weights, chosen_lengths=counts[:pairs],
            rejected_lengths=counts[pairs:], **params)
        return losses.sum(), metrics


class ListwiseObjective(PreferenceObjective):
    """A listwise loss (prefops.losses.listwise) over ranked lists, over the step's lists.

    loss_impl fused: prefops.ListwiseLoss from hidden states and the head weight.
    loss_impl reference: materialised logits, then the same prefops.losses.listwise_loss.
    The pair-based types' NLL term (pairwise_type sft, cpo, orpo) takes the mean chosen
    length over every ordered pair of the step, so it too accumulates exactly. Every
    list has an ordered pair (rows whose scores all tie are skipped), so kendall_tau
    and top1_accuracy are means over lists like the loss.
    """

    METRIC_TOTALS = {"rewards/accuracies": "pairs", "rewards/mean": "responses", "logps/mean": "responses"}

    def counts(self, batch) -> dict:
        """Lists, ordered pairs, responses, and the chosen tokens summed over the ordered pairs."""
        mask = batch.lists >= 0
        counted = (batch.targets != D.IGNORE_INDEX).float()
        lengths = torch.where(mask, M.sequence_sums(counted, batch)[1][batch.lists.clamp_min(0)], 0)
        better = preference_matrix(torch.where(mask, batch.scores, 0.0), mask)
        return {"normaliser": batch.num_examples, "pairs": int(better.sum()), "responses": int(mask.sum()),
                "pair_chosen_tokens": float((better.sum(-1) * lengths).sum())}

    def prepare(self, lm, batches):
        totals = defaultdict(float)
        for batch in batches:
            for name, value in self.counts(batch).items():
                totals[name] += value
        return dict(totals), [self.reference(batch) for batch in batches]

    def nll_mean_length(self, totals) -> float:
        return totals["pair_chosen_tokens"] / max(totals["pairs"], 1)

    def eval_metrics(self, hidden, head, batch, ref) -> dict:
        return {}  # the pairwise ranking metrics; a list's are kendall_tau and top1_accuracy

    def _params(self, mean_length):
        return {**self.config.loss_params,
                **({"nll_mean_length": mean_length} if self.config.loss_type in PAIR_BASED else {})}

    @staticmethod
    def _reference_slots(batch, ref):
        """The reference's per-slot tuple -> [P, K] (None for reference-free losses)."""
        return None if ref[0] is None else torch.stack(ref[:batch.lists.shape[1]], dim=1)

    def _fused(self, hidden, head, batch, ref, mean_length):
        config = self.config
        hidden, weight, bias = head.cast(hidden)
        loss_fn = ListwiseLoss(config.loss_type, config.beta, ignore_index=D.IGNORE_INDEX, temperature=head.temperature,
                               softcap=head.softcap, strategy=config.strategy, budget=config.budget,
                               sequence_group=M.sequence_group(batch), **self._params(mean_length))
        ref_slots, ref_logps = self._reference_slots(batch, ref), None
        if ref_slots is not None:  # per sequence [S], as ListwiseLoss takes it
            mask = batch.lists >= 0
            ref_logps = ref_slots.new_zeros(int(mask.sum())).index_put_((batch.lists[mask],), ref_slots[mask])
        loss, metrics = loss_fn(
            hidden, weight, batch.targets, lists=batch.lists, scores=batch.scores, bias=bias,
            seq_ids=batch.seq_ids if batch.packed else None, ref_logps=ref_logps)
        return loss * batch.num_examples, metrics

    def _reference(self, hidden, head, batch, ref, mean_length):
        config = self.config
        hidden, weight, bias = head.cast(hidden)
        token = reference_ops.linear_logprobs(hidden, weight, batch.targets, bias=bias, ignore_index=D.IGNORE_INDEX,
                                              temperature=head.temperature, softcap=head.softcap)
        sums, counts = M.sequence_sums(token, batch)
        mask = batch.lists >= 0
        slots = lambda values: torch.where(mask, values[batch.lists.clamp_min(0)], 0.0)  # noqa: E731
        losses, metrics = listwise_loss(slots(sums), self._reference_slots(batch, ref), scores=batch.scores, mask=mask,
                                        lengths=slots(counts), loss_type=config.loss_type, beta=config.beta,
                                        **self._params(mean_length))
        return losses.sum(), metrics


class UnpairedObjective:
    """KTO (kto, apo_zero_unpaired) or BCO on labelled completions, over the step's completions.

    Every example carries its completion and a mismatched one (data._with_kl_partners).
    KTO's reference point z_0 = max(0, mean log-ratio of the mismatched completions) is
    taken over the whole step on every rank before any backward pass, without gradient,
    so it does not depend on how the step is split. BCO's running reward mean delta
    is updated once per step with that step's rewards (after its loss, so a step's
    micro-batches all see the same delta); it is saved in checkpoints.
    """

    def __init__(self, config, reference):
        self.config = config
        self.reference = reference  # batch -> (ref_logps, ref_kl_logps)
        self.loss_type = C.loss_types(config)[0]
        self.bco = BCOLoss(config.beta).eval() if self.loss_type == "bco" else None
        self.step_rewards = []

    def prepare(self, lm, batches):
        refs = [self.reference(batch) for batch in batches]
        totals = {"normaliser": sum(batch.num_examples for batch in batches),
                  "desirable": sum(int(batch.labels.sum()) for batch in batches)}
        totals["undesirable"] = totals["normaliser"] - totals["desirable"]
        if self.loss_type == "kto":
            kl_sums = [self._logps(lm, batch.completion(1)) - ref[1] for batch, ref in zip(batches, refs)]
            totals.update(kl_sum=sum(float(kl.sum()) for kl in kl_sums), kl_count=totals["normaliser"])
        return totals, refs

    def _logps(self, lm, batch):
        return M.sequence_logprobs(lm, batch, self.config.loss_impl)[0]

    def _losses(self, logps, ref, labels, kl):
        if self.bco is not None:
            return self.bco(logps, ref, labels)
        return kto_loss(logps, ref, labels, beta=self.config.beta, kl=kl, loss_type=self.loss_type,
                        desirable_weight=self.config.desirable_weight,
                        undesirable_weight=self.config.undesirable_weight)

    def __call__(self, lm, batch, totals, ref):
        own = batch.completion(0)
        kl = max(0.0, totals["kl_sum"] / totals["kl_count"]) if "kl_sum" in totals else None
        ref_logps = ref[0]
        if self.config.loss_impl == "fused":
            def fused(hidden, head):
                hidden, weight, bias = head.cast(hidden)
                return prefops.sequence_objective(
                    hidden, weight, own.targets, bias=bias, seq_ids=own.seq_ids if own.packed else None,
                    groups=torch.arange(own.num_examples, device=hidden.device)[:, None],
                    head=lambda logps, index, stats: self._losses(logps[:, 0], ref_logps[index], own.labels[index],
                                                                  kl)[0].sum(),
                    ignore_index=D.IGNORE_INDEX, temperature=head.temperature, softcap=head.softcap,
                    strategy=self.config.strategy, budget=self.config.budget, sequence_group=M.sequence_group(own))
            out = lm(own, fused)
            loss, logps = out.loss, out.logps
        else:
            logps = self._logps(lm, own)
            loss = self._losses(logps, ref_logps, own.labels, kl)[0].sum()
            logps = logps.detach()
        rewards = self.config.beta * (logps - ref_logps)
        self.step_rewards.append(rewards)
        labels = own.labels
        return loss, {"rewards/chosen": float(rewards[labels].sum()), "rewards/rejected": float(rewards[~labels].sum()),
                      "logps/chosen": float(logps[labels].sum()), "logps/rejected": float(logps[~labels].sum())}

    def finish(self, sums, totals):
        record = {"loss": sums["loss"] / totals["normaliser"]}
        for name, group in (("chosen", "desirable"), ("rejected", "undesirable")):
            if totals[group]:
                for kind in ("rewards", "logps"):
                    record[f"{kind}/{name}"] = sums[f"{kind}/{name}"] / totals[group]
        if totals["desirable"] and totals["undesirable"]:
            record["rewards/margins"] = record["rewards/chosen"] - record["rewards/rejected"]
        if "kl_sum" in totals:
            record["kl"] = max(0.0, totals["kl_sum"] / totals["kl_count"])
        if self.bco is not None:
            record["delta"] = float(self.bco.delta)
        return record

    def end_step(self, training: bool) -> None:
        rewards, self.step_rewards = torch.cat(self.step_rewards), []
        if self.bco is not None and training:
            rewards = distributed.all_gather(rewards)
            with torch.no_grad():
                self.bco.train()  # BCOLoss folds the rewards it is given into delta in train mode
                self.bco(rewards / self.config.beta, torch.zeros_like(rewards),
                         torch.ones_like(rewards, dtype=torch.bool))
                self.bco.eval()

    def state_dict(self) -> dict:
        return self.bco.state_dict() if self.bco is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.bco is not None:
            self.bco.load_state_dict(state)

"""Online and iterative preference learning: sample, judge, pair, train, refresh -- round after round.

A run with an `online:` section (ONLINE_KEYS) trains on its own samples. Each round:
  1. sample K completions for each of the round's prompts from the current policy
     (sampling.sample: transformers' generate with its KV cache), or from the geometric
     mixture of policy and reference, logits (1-a) z_theta + a z_ref (IPO-MD / Nash-MD);
     with teacher or gold (DNO, candidates.py) their completions join each prompt's; with
     tree_depth a tree of steps per prompt instead, whose sibling steps are paired (MCTS-DPO,
     step_tree.py);
  2. judge them (judges.make_judge: the task's scorer, a module:function, a local reward
     model, a pairwise judge returning P(a > b), or the policy itself comparing its own
     samples, OSP's self-preferring judge); a sample the judge fails on is dropped
     and counted, never trained on;
  3. build pairs or ranked lists (pairing.build_records), optionally soft labels, an
     uncertainty filter over repeated judging or an ensemble, and weights from the
     judge's certainty (UPO); for the self-play losses (sppo_response, gpo, spo) one list
     per prompt whose per-response targets are each sample's win rate or preference score
     against the round's K samples (pairs: responses, prefops.losses.self_play);
  4. train steps_per_round optimizer steps on them with the configured loss, exactly as
     offline (the same objectives, fused ops, FSDP2 path);
  5. refresh the reference: reference_update never (the SFT policy throughout) or round
     (the policy at the start of each round), or APO's extrapolated reference
     log pi_t + a (log pi_t - log pi_{t-1}) (apo_alpha > 0; Accelerated Preference
     Optimization, He et al. 2024).
Offline DPO on pairs sampled once from the SFT policy is the same loop with one round:
rounds 1, prompts_per_round R*n, steps_per_round R*s spends the judge calls of R rounds.

Pairs train on the token ids the policy sampled, not on their text encoded again (which need not
give the same ids), with EOS only where it was sampled. One optimizer and one learning-rate
schedule span all rounds. Checkpoints (round ends and
every checkpoint_every steps) hold the round's pairs, the reference weights and the RNG,
so a run resumed mid-round trains on the same pairs and reproduces the uninterrupted run.
Under torchrun each rank samples and judges its share of the prompts (in fixed batches
with their own seeds, so the samples do not depend on the number of ranks) on a local
unsharded copy of the policy, and every rank gets every judged sample and the judge's
counts of every rank: a run on N ranks logs the rounds, pairs and judge budget of one
process (tests/test_online_distributed.py).
"""
from __future__ import annotations

import dataclasses
import time
import zlib

import torch
from tqdm import tqdm

import prefops
from prefops.losses.self_play import TARGETS

from . import config as C
from . import data as D
from . import distributed, judges, pairing, references, sampling, step_tree
from .candidates import Candidates
from . import model as M
from .loop import Stage, Trainer, format_record, say


def _seed(*parts) -> int:
    """A stable 31-bit seed from the run's seed and where it is used (round, batch, purpose)."""
    return zlib.crc32("-".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclasses.dataclass
class Round:
    """What a round trains on: saved in checkpoints, so a resumed round trains on the same pairs."""
    index: int
    records: list          # data.Record
    stats: dict            # sampling, judging and pairing figures of the round


class OnlineTrainer(Trainer):
    """The online loop (module docstring). `judge` overrides online.judge from Python: a judges.Judge, or a
    function (prompts, completions) -> one number per completion, larger is better."""

    def __init__(self, config, judge=None):
        super().__init__(config)
        self.online = C.online_options(config)
        if judge is None:
            judge = judges.make_judge(self.online["judge"], task=self.task, device=self.device, self_judge=dict(
                tokenizer=self.tokenizer, template=self.online["self_judge_template"],
                answers=self.online["self_judge_answers"]))
        elif not isinstance(judge, judges.Judge):
            judge = judges.FunctionJudge(getattr(judge, "__name__", "judge"), judge)
        self.judge = judge
        if self.online["tree_depth"] and distributed.active():
            raise ValueError("online.tree_depth (MCTS-DPO step pairs) grows its trees in one process: run it "
                             "without torchrun")
        self.candidates = Candidates(self.online, self.tokenizer, task=self.task, device=self.device,
                                     vocab_size=self.model.config.vocab_size)
        source = self.online["prompts"]
        rows = [] if source is None else D.read_rows(source, kind="sft", size=0, seed=config.seed)
        self.prompt_pool = [D._require(where, row, "prompt") for where, row in rows] if rows else None
        self.eval_prompts = self.prompts(self.online["eval_prompts"], "eval")
        self.baseline = None    # (completions, scores) of the starting policy on eval_prompts
        self.previous = None    # the same for the policy at the end of the previous round
        self.reference_states = []  # reference weights of this round (and of the last, for APO) on CPU
        self.train_judge_calls = 0  # the judge budget of training samples (evaluation's calls not counted)

    # --- prompts, samples, judgements

    def prompts(self, n: int, purpose) -> list[str]:
        """n prompts for a round or for evaluation: the task's, or drawn (seeded) from online.prompts rows."""
        if self.prompt_pool is None:
            return self.task.prompts(n, f"online-{purpose}-{self.config.seed}")
        generator = torch.Generator().manual_seed(_seed(self.config.seed, "prompts", purpose))
        return [self.prompt_pool[i] for i in torch.randint(len(self.prompt_pool), (n,), generator=generator).tolist()]

    def local_copy(self, model):
        """What generate() runs on: `model`, or under FSDP2 a full local copy of it (FSDP's layers
        gather their shards collectively, and ranks generate different numbers of tokens)."""
        if not distributed.sharding():
            return model
        # M.build seeds torch's RNG: the run's RNG must not depend on the number of ranks.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            copy, _ = M.build(self.config, self.device, self.task and self.task.alphabet)
        copy.load_state_dict(distributed.full_model_state(model))
        return copy.eval().requires_grad_(False)

    def sample_and_judge(self, prompts: list[str], k: int, purpose, reference=None, candidates=None) -> dict:
        """Every rank's samples and judgements of `prompts` (k each, and `candidates`' teacher or gold ones
        after them, DNO), sampled in fixed seeded batches.

        Under torchrun the judge's calls and failures become those of every rank, and the times those of
        the slowest rank (they sample at once)."""
        online, judge = self.online, self.judge
        size = online["sample_batch_size"]
        batches = [(b, prompts[start:start + size]) for b, start in enumerate(range(0, len(prompts), size))]
        mine = batches[distributed.rank()::distributed.world_size()]
        parts, model = {}, self.local_copy(self.model)
        if isinstance(judge, judges.SelfPreferringJudge):  # OSP: the policy judges its own samples
            judge.model = model
        calls, failed = judge.calls, judge.failed
        for b, chunk in tqdm(mine, desc=f"sampling {purpose}", unit="batch", leave=False, dynamic_ncols=True,
                             disable=not distributed.is_main() or purpose == "eval"):
            began = time.perf_counter()
            samples = sampling.sample(
                model, self.tokenizer, chunk, k=k, max_new_tokens=self.max_new_tokens,
                temperature=online["temperature"], top_p=online["top_p"], seed=_seed(self.config.seed, purpose, b),
                device=self.device, batch_size=size, reference=reference,
                mixture_alpha=online["mixture_alpha"] if reference is not None else 0.0,  # evaluation: the policy
                progress=False)
            if candidates is not None:
                samples = candidates.add(samples, seed=_seed(self.config.seed, purpose, b, "teacher"),
                                         max_new_tokens=self.max_new_tokens, temperature=online["temperature"],
                                         top_p=online["top_p"], batch_size=size)
            sampled = time.perf_counter()
            scores, spread, preferences = self.judgements(chunk, samples.completions)
            parts[b] = dict(completions=samples.completions, completion_ids=samples.completion_ids, scores=scores,
                            spread=spread, preferences=preferences,
                            new_tokens=samples.new_tokens, sample_s=sampled - began,
                            judge_s=time.perf_counter() - sampled)
        ranks = distributed.all_gather_objects(dict(
            parts=parts, calls=judge.calls - calls, failed=judge.failed - failed, last_error=judge.last_error,
            **{key: sum(part[key] for part in parts.values()) for key in ("sample_s", "judge_s")}))
        for each in ranks:
            parts.update(each["parts"])
        judge.calls, judge.failed = calls + sum(r["calls"] for r in ranks), failed + sum(r["failed"] for r in ranks)
        judge.last_error = next((r["last_error"] for r in ranks if r["last_error"]), judge.last_error)
        ordered = [parts[b] for b, _ in batches]
        cat = lambda key: None if ordered[0][key] is None else torch.cat([p[key] for p in ordered])  # noqa: E731
        return dict(prompts=prompts, completions=[c for p in ordered for c in p["completions"]],
                    completion_ids=[c for p in ordered for c in p["completion_ids"]], scores=cat("scores"),
                    spread=cat("spread"), preferences=cat("preferences"),
                    new_tokens=sum(p["new_tokens"] for p in ordered),
                    sample_s=max(r["sample_s"] for r in ranks), judge_s=max(r["judge_s"] for r in ranks))

    @property
    def max_new_tokens(self) -> int:
        given = self.online["max_new_tokens"]
        return given if given is not None else getattr(self.task, "max_new_tokens", 64)

    def judgements(self, prompts, completions):
        """(scores [P, K], their spread or None, preferences [P, K, K] or None); NaN where the judge failed.

        A pairwise judge is asked judge_repeats times per unordered pair; its spread is then the standard error
        of each mean P(i beats j), [P, K, K] (or that of a pairwise ensemble's members), and a completion's
        score its mean win probability over the comparisons that did not fail. A scalar judge's spread is
        the sd of each score, [P, K]."""
        repeats = self.online["judge_repeats"]
        if self.judge.pairwise:
            if repeats > 1:
                preferences, spread = judges.repeat_preferences(self.judge, prompts, completions, repeats)
            else:
                preferences, spread = self.judge.preferences_with_spread(prompts, completions)
            return judges.mean_win_probability(preferences), spread, preferences
        if repeats > 1:
            scores, spread = judges.repeat_scores(self.judge, prompts, completions, repeats)
        else:
            scores, spread = self.judge.scores_with_spread(prompts, completions)
        return scores, spread, None

    # --- references

    def round_reference(self):
        """(batch -> reference log-probs per slot, the reference model) of this round (module docstring)."""
        config = self.config
        current = self.frozen(self.reference_states[-1])
        if self.reference_kind() == "none":
            return references.no_reference, current
        if C.is_token_level(config):
            return references.frozen_distributions(current, self.autocast), current
        logps = references.frozen_model(current, config.loss_impl, self.autocast, config.ld_alpha)
        alpha = self.online["apo_alpha"]
        if not alpha or len(self.reference_states) < 2:
            return logps, current
        previous = references.frozen_model(self.frozen(self.reference_states[-2]), config.loss_impl,
                                           self.autocast, config.ld_alpha)

        def extrapolated(batch):  # APO: log pi_t + alpha (log pi_t - log pi_{t-1})
            return tuple((1 + alpha) * now - alpha * before for now, before in zip(logps(batch), previous(batch)))
        return extrapolated, current

    # --- one round

    def new_round(self, index: int, reference_lm) -> Round:
        """Sample, judge and pair the prompts of round `index`."""
        config, online = self.config, self.online
        prompts = self.prompts(online["prompts_per_round"], f"round{index}")
        mixture = self.local_copy(reference_lm.model) if online["mixture_alpha"] else None
        calls = self.judge.calls
        if online["tree_depth"]:
            records, judged = self.step_tree_pairs(prompts, index)
            stats = judged["stats"]
        else:
            judged = self.sample_and_judge(prompts, online["samples_per_prompt"], f"round{index}", reference=mixture,
                                           candidates=self.candidates if self.candidates.active else None)
            uncertain = online["uncertainty_z"] is not None or online["uncertainty_weighting"]
            records, stats = pairing.build_records(
                prompts, judged["completions"], judged["scores"], mode=online["pairs"], min_margin=online["min_margin"],
                soft_labels=online["soft_labels"], soft_label_scale=online["soft_label_scale"],
                preferences=judged["preferences"], uncertainty_z=online["uncertainty_z"],
                uncertainty_weighting=online["uncertainty_weighting"], spread=judged["spread"] if uncertain else None,
                where=f"round{index}", completion_ids=judged["completion_ids"],
                targets=TARGETS[config.loss_type] if C.is_self_play(config) else None)
        self.train_judge_calls += self.judge.calls - calls
        scores = judged["scores"][torch.isfinite(judged["scores"])]
        if self.judge.failed:
            say(f"[round {index + 1}] the judge failed on {self.judge.failed} sample(s) so far, dropped "
                f"(last error: {self.judge.last_error})")
        stats.update(round=index, judge_calls=int(self.train_judge_calls), judge_failed=self.judge.failed,
                     new_tokens=judged["new_tokens"],
                     generation_tokens_per_s=judged["new_tokens"] / max(judged["sample_s"], 1e-9),
                     sample_s=judged["sample_s"], judge_s=judged["judge_s"],
                     **({"reward/mean": float(scores.mean()), "reward/std": float(scores.std(correction=0))}
                        if scores.numel() else {}))
        if not records:
            raise RuntimeError(f"round {index}: no pair to train on ({stats}); the samples all tie or the judge "
                               "failed on them: raise samples_per_prompt or temperature, or check the judge")
        return Round(index, records, stats)

    def step_tree_pairs(self, prompts: list[str], index: int):
        """MCTS-DPO's step-level pairs of the round's prompts (step_tree.py), sampled by the policy now."""
        online, tokenizer = self.online, self.tokenizer
        boundary = None
        if online["step_boundary"] is not None:
            ids = tokenizer.encode(online["step_boundary"], add_special_tokens=False)
            if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
                raise C.ConfigError(f"online.step_boundary {online['step_boundary']!r} must be one token of the "
                                    f"policy's vocabulary; it encodes to {ids} (null: steps of step_max_tokens)",
                                    "online")
            boundary = ids[0]
        if isinstance(self.judge, judges.SelfPreferringJudge):
            self.judge.model = self.model
        return step_tree.step_pairs(
            self.model, tokenizer, self.judge, prompts, where=f"round{index}", depth=online["tree_depth"],
            branching=online["tree_branching"], boundary=boundary, step_max_tokens=online["step_max_tokens"],
            rollout_tokens=self.max_new_tokens, temperature=online["temperature"], top_p=online["top_p"],
            seed=_seed(self.config.seed, f"round{index}", "tree"), device=self.device,
            batch_size=online["sample_batch_size"])

    def round_dataset(self, current: Round) -> D.Dataset:
        config = self.config
        records = current.records
        if C.is_unpaired(config):  # KTO, BCO: a pair's chosen is desirable, its rejected undesirable
            records = [D.Record(r.where, r.prompt, [completion], label=desirable, completion_ids=[ids])
                       for r in records for completion, ids, desirable in zip(r.completions, r.completion_ids,
                                                                             (True, False))]
        return D.build_dataset(records, self.tokenizer, config.max_length, [], config.append_eos, config.seed)

    @torch.no_grad()
    def round_evaluation(self, current: Round, dataset: D.Dataset, reference_lm, step: int) -> dict:
        """The policy after a round: win rates by the judge against the starting policy and the previous
        round's, and KL to the reference and top-k diagnostics on the round's samples (the task's accuracy
        and the eval set's metrics come from Trainer.evaluate)."""
        record = dict(current.stats)
        judged = self.sample_and_judge(self.eval_prompts, 1, "eval")
        latest = (judged["completions"], judged["scores"], judged["preferences"])
        for name, other in (("win_rate/vs_start", self.baseline), ("win_rate/vs_previous", self.previous)):
            record[name] = self.win_rate(latest, other)
        self.previous = latest
        record.update(self.sample_diagnostics(dataset, reference_lm))
        return record

    def win_rate(self, new, old) -> float:
        """P(new sample beats old sample) on the same prompts, by the judge; ties count half."""
        if self.judge.pairwise:
            pairs = [[a[0], b[0]] for a, b in zip(new[0], old[0])]
            probs = self.judge.preferences(self.eval_prompts, pairs)[:, 0, 1]
            return float(probs[torch.isfinite(probs)].mean())
        a, b = new[1][:, 0], old[1][:, 0]
        judged = torch.isfinite(a) & torch.isfinite(b)
        a, b = a[judged], b[judged]
        return float(((a > b).double() + 0.5 * (a == b).double()).mean())

    def sample_diagnostics(self, dataset: D.Dataset, reference_lm) -> dict:
        """Mean per-token KL(policy || reference), entropy and top-k mass over the round's completions.

        Every rank runs every batch (so FSDP's collectives pair up) and gets the same means."""
        config = self.config
        totals, tokens = {}, 0
        self.lm.eval()
        for start in range(0, len(dataset), config.micro_batch_size):
            batch = D.collate(dataset, list(range(start, min(start + config.micro_batch_size, len(dataset)))),
                              packing=config.packing, shared_prompt=config.shared_prompt).to(self.device)
            with self.autocast():
                ref = references.frozen_distributions(reference_lm, self.autocast)(batch)

                def diagnose(hidden, head):
                    hidden, weight, bias = head.cast(hidden)
                    ref_hidden, ref_weight, ref_bias = ref[1].cast(ref[0])
                    return prefops.linear_diagnostics(
                        hidden, weight, batch.targets, bias=bias, ignore_index=D.IGNORE_INDEX,
                        temperature=head.temperature, softcap=head.softcap, ref_hidden=ref_hidden.to(hidden.dtype),
                        ref_weight=ref_weight.to(hidden.dtype),
                        ref_bias=None if ref_bias is None else ref_bias.to(hidden.dtype), kl_direction="policy_ref")
                diagnostics = self.lm(batch, diagnose)
            counted = batch.targets != D.IGNORE_INDEX
            tokens += int(counted.sum())
            for name in ("kl_to_reference", "entropy", "top_k_mass"):
                totals[name] = totals.get(name, 0.0) + float(getattr(diagnostics, name)[counted].sum())
        self.lm.train()
        return {"kl": totals["kl_to_reference"] / tokens, "entropy": totals["entropy"] / tokens,
                "top_k_mass": totals["top_k_mass"] / tokens}

    # --- the run

    def preference_stage(self, log, resume: dict | None) -> None:
        config, online = self.config, self.online
        rounds, per_round = online["rounds"], online["steps_per_round"]
        total = rounds * per_round
        # The task's held-out pairs carry no preference_prob or margin, which sppo and modpo need, and its ranked
        # rows' scores are not the win rates or preference scores the self-play losses read.
        task_pairs = (self.task is not None and not set(C.loss_types(config)) & {"sppo", "modpo"}
                      and not C.is_self_play(config))
        eval_set = self.datasets("dpo")[1] if config.eval_data or task_pairs else None
        objective, eval_objective = self.objective(None), eval_set and self.objective(None)
        self.stages["dpo"] = Stage(total, config.lr, None, objective, eval_set, eval_objective)
        optimizer, scheduler = self.optimizer(config.lr, total)
        if resume is not None and "online" in resume:
            saved = resume["online"]
            self.reference_states, self.baseline, self.previous = (
                saved["reference_states"], saved["baseline"], saved["previous"])
            self.judge.calls, self.judge.failed = saved["judge_calls"], saved["judge_failed"]
            self.train_judge_calls = saved["train_judge_calls"]
            current = Round(saved["round"]["index"], [D.Record(**r) for r in saved["round"]["records"]],
                            saved["round"]["stats"])
            step = self.restore(resume, optimizer, scheduler, objective)
        else:
            self.reference_states = [self.snapshot()]
            current, step = None, 0
        reference, reference_lm = self.round_reference()
        for each in (objective, eval_objective):
            if each:
                each.reference = reference
        if current is None:
            judged = self.sample_and_judge(self.eval_prompts, 1, "eval")
            self.baseline = self.previous = (judged["completions"], judged["scores"], judged["preferences"])
            log.write(self.evaluate("dpo", 0))
        self.lm.train()
        bar = tqdm(total=total, initial=step, desc="online", dynamic_ncols=True, disable=not distributed.is_main())
        while step < total:
            index = step // per_round
            if current is None or current.index != index:  # a new round (a resumed one keeps its pairs)
                if index and config.reference_update == "round":
                    self.reference_states = [*self.reference_states[-1:], self.snapshot()]
                    reference, reference_lm = self.round_reference()
                    for each in (objective, eval_objective):
                        if each:
                            each.reference = reference
                current = self.new_round(index, reference_lm)
                say(f"[round {index + 1}/{rounds}] {format_round(current.stats)}")
            dataset = self.round_dataset(current)
            training_began = time.perf_counter()
            for step in range(step, (index + 1) * per_round):
                record = {**self.train_step("dpo", step, dataset, objective, optimizer, scheduler), "round": index}
                bar.update(1)
                done = step + 1
                if done % config.log_every == 0 or done % per_round == 0:
                    log.write(record)
                if done % per_round == 0:
                    current.stats["train_s"] = time.perf_counter() - training_began  # since a resume, if resumed
                    evaluation = self.evaluate("dpo", done)
                    evaluation.update(self.round_evaluation(current, dataset, reference_lm, done))
                    log.write(evaluation)
                    say(format_record(evaluation) + " " + format_round(evaluation))
                if done % config.checkpoint_every == 0 or done % per_round == 0:
                    self.save_online(done, optimizer, scheduler, current)
            step = done
        bar.close()

    def save_online(self, step: int, optimizer, scheduler, current: Round) -> None:
        self.save(self.out_dir / "last.pt", "dpo", step, optimizer, scheduler, extra={"online": {
            "round": dataclasses.asdict(current), "reference_states": self.reference_states,
            "baseline": self.baseline, "previous": self.previous, "judge_calls": self.judge.calls,
            "judge_failed": self.judge.failed, "train_judge_calls": self.train_judge_calls}})


def format_round(record: dict) -> str:
    shown = ("pairs", "pair_yield", "reward/mean", "win_rate/vs_start", "win_rate/vs_previous", "judge_calls",
             "generation_tokens_per_s", "sample_s", "judge_s", "train_s")
    return " ".join(f"{key}={record[key]:.4g}" for key in shown if key in record)

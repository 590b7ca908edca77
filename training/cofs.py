"""COFS-DPO: OFS-DPO across data domains, the domains' fast modules combined linearly.

Cross-domain Online Fast-Slow chasing DPO (Qi et al. 2024, arXiv:2406.05534, the extension of OFS-DPO,
ofs.py): to learn domain after domain without forgetting the earlier ones, it "leverages linear combinations
of fast modules parameters from different task domains". With ofs_dpo.domains [D_1, ..., D_n] (data sources)
the preference stage runs OFS-DPO on D_1, then on D_2, ... (each its own stage: its steps, a fresh optimizer,
its own eval split), keeping the fast adapter's parameters θ_d at the end of each domain, and the policy's
fast adapter is then
    θ_fast = Σ_d w_d θ_d          (ofs_dpo.combine_weights w, >= 0 and summing to 1; default 1/n each),
every LoRA matrix (A and B) combined entry by entry. The combined policy is evaluated on every domain's eval
split (records with cofs/domain) and saved as last.pt.
Our reading, where the paper's summary leaves it open: each domain continues from the adapters as the
previous domain left them (a continual run), the combination is of the parameters themselves (as the summary
says) rather than of each module's update B A, and it is taken once, after the last domain; the slow adapter
is not combined (it only paces the fast one during training). A run with domains cannot resume mid-way.
"""
from __future__ import annotations

import dataclasses

import torch

from . import config as C
from .adapters import adapter_parameters


def combine(modules: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """Σ_d w_d θ_d for each parameter (modules[d] the parameters of domain d's fast module, in one order)."""
    if len(modules) != len(weights) or not modules:
        raise ValueError(f"one weight per module: {len(modules)} modules, {len(weights)} weights")
    return [sum(w * values[i] for w, values in zip(weights, modules)) for i in range(len(modules[0]))]


def domain_weights(config) -> list[float]:
    options = C.ofs_options(config)
    domains = options["domains"]
    return options["combine_weights"] or [1 / len(domains)] * len(domains)


def run_domains(trainer, log) -> list[list[torch.Tensor]]:
    """The preference stage of a COFS-DPO run (module docstring); the domains' fast modules, on CPU."""
    config = trainer.config
    domains, weights = C.ofs_options(config)["domains"], domain_weights(config)
    modules = []
    try:
        for source in domains:
            trainer.config = dataclasses.replace(config, data=source)
            trainer.prepare("dpo")
            trainer.run_stage("dpo", log, None)
            modules.append([p.detach().to("cpu", copy=True) for p in adapter_parameters(trainer.model, "fast")])
        with torch.no_grad():
            for parameter, value in zip(adapter_parameters(trainer.model, "fast"), combine(modules, weights),
                                        strict=True):
                parameter.copy_(value)
        for d, source in enumerate(domains):
            trainer.config = dataclasses.replace(config, data=source)
            trainer.prepare("dpo")
            log.write({**trainer.evaluate("dpo", config.steps), "cofs/domain": d, "cofs/combined": True})
    finally:
        trainer.config = config
    trainer.save(trainer.out_dir / "last.pt", "dpo", config.steps)
    return modules

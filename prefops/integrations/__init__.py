"""Adapters that put the fused losses into training code users already run.

prefops.integrations.hf works with any transformers causal LM; prefops.integrations.trl
(needs the optional `trl` extra) is TRL's DPOTrainer with the fused loss.
"""
from .hf import LMHead, PreferenceInputs, check_head, completion_logps, final_hidden_states, preference_loss

__all__ = ["LMHead", "PreferenceInputs", "check_head", "completion_logps", "final_hidden_states", "preference_loss"]

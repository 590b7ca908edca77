"""Sequence-level preference losses shared by the fused and the reference path."""
from .curriculum import CurriculumPair, curriculum_pairs
from .diffusion import diffusion_dpo_loss, mapo_loss
from .listwise import LISTWISE_LOSSES, LISTWISE_PARAM_DEFAULTS, listwise_loss
from .self_play import SELF_PLAY_LOSSES, response_targets
from .pairwise import F_DIVERGENCES, LOSSES, PARAM_DEFAULTS, REFERENCE_FREE, TOKEN_LEVEL_LOSSES, pairwise_loss
from .token_level import TDPO_VARIANTS, tdpo_loss, tgdpo_loss, tgdpo_token_rewards, tgdpo_token_weights
from .unpaired import BCOLoss, kto_kl_estimate, kto_loss
from .weights import ld_dpo_token_weights, wpo_weights

__all__ = [
    "pairwise_loss", "LOSSES", "PARAM_DEFAULTS", "REFERENCE_FREE", "F_DIVERGENCES", "TOKEN_LEVEL_LOSSES",
    "tdpo_loss", "TDPO_VARIANTS", "tgdpo_loss", "tgdpo_token_rewards", "tgdpo_token_weights",
    "listwise_loss", "LISTWISE_LOSSES", "SELF_PLAY_LOSSES", "response_targets",
    "LISTWISE_PARAM_DEFAULTS", "curriculum_pairs", "CurriculumPair",
    "kto_loss", "kto_kl_estimate", "BCOLoss",
    "diffusion_dpo_loss", "mapo_loss",
    "ld_dpo_token_weights", "wpo_weights",
]

"""OFS-DPO's fast and slow LoRA adapters (peft) on a model: built with it (model.build), switched, swapped.

ofs.py trains them (module docstring there); they live here so that model.build can add them without
importing the objective, which builds on model.py.
"""
from __future__ import annotations

import contextlib

import torch

from prefops.versions import PEFT_ADAPTERS, require

from . import config as C
from . import distributed

ADAPTERS = ("fast", "slow")


def add_adapters(model, config):
    """`model` wrapped by peft with the fast and slow adapters (one LoraConfig; B = 0, so each starts as the
    model); the adapters train, the model's own weights are frozen."""
    require("peft", PEFT_ADAPTERS, "ofs_dpo (its fast and slow LoRA adapters)")
    import peft

    if distributed.active():
        raise ValueError("ofs_dpo runs in one process (its adapter swaps and passes are not sharded): "
                         "run it without torchrun")
    options = C.ofs_options(config)
    lora = peft.LoraConfig(r=options["rank"], lora_alpha=options["alpha"], target_modules=options["target_modules"],
                           lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(model, lora, adapter_name="fast")
    except ValueError as error:  # target_modules that match nothing, or an architecture peft has no default for
        raise C.ConfigError(f"ofs_dpo.target_modules {options['target_modules']!r}: {error}", "ofs_dpo") from error
    model.add_adapter("slow", lora)
    train_adapters(model)
    return model


def _lora_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def adapter_parameters(model, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter `name`, in one order for both adapters (the swap pairs them up)."""
    return [parameter for layer in _lora_layers(model) for attribute in layer.adapter_layer_names
            if name in getattr(layer, attribute) for parameter in getattr(layer, attribute)[name].parameters()]


def _set_trainable(model, adapters: bool) -> None:
    """Train the adapters (the model's own weights frozen), or the reverse."""
    adapter_ids = {id(p) for name in ADAPTERS for p in adapter_parameters(model, name)}
    for parameter in model.parameters():
        parameter.requires_grad_((id(parameter) in adapter_ids) == adapters)


def train_base(model) -> None:
    """SFT: the model's own weights train; the adapters stay frozen at zero, so they change no output."""
    _set_trainable(model, adapters=False)


def train_adapters(model) -> None:
    """The preference stage: both adapters train, the model's own weights are frozen; fast is active."""
    activate(model, "fast")
    _set_trainable(model, adapters=True)


def _adapters_train(model) -> bool:
    return adapter_parameters(model, "fast")[0].requires_grad


def activate(model, name: str) -> None:
    """Run the model with adapter `name`. peft's set_adapter also freezes the inactive adapter; the
    other's pass of this micro-batch still needs its gradient, so what trains is left as it was."""
    adapters = _adapters_train(model)
    model.set_adapter(name)
    _set_trainable(model, adapters)


@contextlib.contextmanager
def adapters_off(model):
    """The model without its adapters, in eval mode (no dropout: a deterministic reference)."""
    layers, adapters, training = _lora_layers(model), _adapters_train(model), model.training
    for layer in layers:
        layer.enable_adapters(False)
    model.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(training)
        _set_trainable(model, adapters)


def parameter_groups(model, lr: float, config) -> list[dict]:
    """AdamW's groups: fast at lr, slow at lr / lr_ratio, and the model's own weights at lr (they train only
    in SFT, where the adapters are frozen; a parameter without a gradient is skipped by the step)."""
    fast, slow = adapter_parameters(model, "fast"), adapter_parameters(model, "slow")
    adapter_ids = {id(p) for p in fast + slow}
    rest = [p for p in model.parameters() if id(p) not in adapter_ids]
    return [{"params": fast, "lr": lr}, {"params": slow, "lr": lr / C.ofs_options(config)["lr_ratio"]},
            {"params": rest, "lr": lr}]


@torch.no_grad()
def swap_adapters(model, optimizer) -> None:
    """The adapters exchange weights and optimizer state: the one that was slow now trains at the fast rate."""
    for fast, slow in zip(adapter_parameters(model, "fast"), adapter_parameters(model, "slow"), strict=True):
        kept = fast.detach().clone()
        fast.copy_(slow)
        slow.copy_(kept)
        optimizer.state[fast], optimizer.state[slow] = optimizer.state[slow], optimizer.state[fast]

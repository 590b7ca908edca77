"""The release a feature needs, checked where the feature is used.

pyproject.toml states the same floors, but an environment can hold older releases anyway
(a GPU box's preinstalled stack, `pip install --no-deps`, a source checkout on PYTHONPATH),
and there the failure comes from deep inside the dependency with a message that does not
say "upgrade". `import prefops` stays free of these checks: it must not import torch or
transformers, and the versions are read from the installed metadata, so a check imports
nothing either.
"""
from __future__ import annotations

import re
from importlib import metadata

# The floors, each found by running the tests on older releases (the commit that set them says which
# version failed how). pyproject.toml's [project] dependencies and extras repeat them.
TRANSFORMERS_ATTENTION = "5.4"  # 5.3's attention-mask interface passes cache_position, not q_length / q_offset
TRANSFORMERS_PACKED = "4.54"  # older releases attend across packed sequences unless the model runs flash
TRL_DROP_INS = "1.15"  # 1.14's DPOTrainer with a PEFT policy gives another loss than the drop-in
PEFT_ADAPTERS = "0.18"  # 0.16 and 0.17 import transformers' HybridCache, which transformers 5 removed


def release(text: str) -> tuple[int, ...]:
    """The leading numeric parts of a version: '5.4.0' -> (5, 4, 0); '2.4.0rc1', '2.4.0+cpu' -> (2, 4, 0)."""
    parts = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break
    return tuple(parts)


def installed_version(package: str) -> str | None:
    """The installed distribution's version, None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def require(package: str, minimum: str, feature: str) -> None:
    """Raise ImportError naming `package`, the installed and the needed version and the fix, unless
    `package` >= `minimum` is installed. `feature` says what needs it, as the user wrote it."""
    version = installed_version(package)
    if version is not None and release(version) >= release(minimum):
        return
    have = "is not installed" if version is None else f"{version} is installed"
    raise ImportError(f"{feature} needs {package} >= {minimum}; {package} {have}: "
                      f"pip install '{package}>={minimum}'")

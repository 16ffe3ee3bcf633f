"""Backdoor attacks: a registry of attack configs, pixel-space triggers, data poisoning and the
trigger gallery (DESIGN.md "Attacks")."""
from d3jax.attacks.clean import CleanModel
from d3jax.attacks.gallery import write_gallery
from d3jax.attacks.poison import (PoisonedSet, apply_trigger, backdoor_test_set, poison,
                                  poison_dataset, poison_multi, untargeted_success_rate)
from d3jax.attacks.registry import get, get_trigger, names
from d3jax.attacks.triggers import LABEL_MODES, SIG, Additive, BadNets, Blended, Trigger
from d3jax.attacks.warp import Warp

__all__ = [
    "Additive", "BadNets", "Blended", "CleanModel", "LABEL_MODES", "PoisonedSet", "SIG", "Trigger",
    "Warp", "apply_trigger", "backdoor_test_set", "get", "get_trigger", "names", "poison",
    "poison_dataset", "poison_multi", "untargeted_success_rate", "write_gallery",
]

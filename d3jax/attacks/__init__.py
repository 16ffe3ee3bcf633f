"""Backdoor attacks: pixel-space triggers and data poisoning (DESIGN.md "Attacks", spec §2)."""
from d3jax.attacks.poison import (LABEL_MODES, PoisonedSet, apply_trigger, backdoor_test_set,
                                  poison, poison_dataset)
from d3jax.attacks.triggers import BadNets, Blended, Trigger, get_trigger

__all__ = [
    "BadNets", "Blended", "LABEL_MODES", "PoisonedSet", "Trigger", "apply_trigger",
    "backdoor_test_set", "get_trigger", "poison", "poison_dataset",
]

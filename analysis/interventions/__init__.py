"""The intervention layer in one import: steering, ablation and clamping context managers.

    from analysis.interventions import steer, steer_sae, clamp_features, ablate_features, ablate_direction

Each is a context manager over `activations.hooks.residual_hooks` (the one hook mechanism); compose them
by nesting `with` blocks. See docs/interventions.md.
"""
from analysis.interventions.ablation import ablate_direction, ablate_features, clamp_features
from analysis.interventions.steering import OPERATORS, steer, steer_sae

__all__ = ["OPERATORS", "ablate_direction", "ablate_features", "clamp_features", "steer", "steer_sae"]

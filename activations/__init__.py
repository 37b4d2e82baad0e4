"""activations package of refusal-sae."""

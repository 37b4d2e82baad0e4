"""probes package of refusal-sae."""

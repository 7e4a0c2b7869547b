"""Interventions: what a unit does for the model (ablation) and how adversarial noise moves the
units. Uses data/, models/ and dissection/; viz/ and reports/ never import it."""

"""``comp demo``: the SigLIP recipe end to end on toy models and toyworld, evaluated and
reported (``run``: phases; ``report``: report.md and figures)."""

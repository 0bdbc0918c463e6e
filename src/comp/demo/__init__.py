"""``comp demo``: the SigLIP recipe end to end on toy models and toyworld, evaluated and
reported (``run``: phases; ``report``: report.md and figures; ``pretrain``: the toy
pre-trained SigLIP and Qwen2 the recipe continues from, with ``wordtok``'s one-token-per-word
tokenizer)."""

"""The registry of vision families: name -> ``Family`` (the interface is declared in
encoder.py). Adding a family = one module defining ``FAMILY`` plus one line here and its
name in configuration.FAMILIES (kept torch-free for AutoConfig; a test checks both agree).

Shipped by ``comp export-vfm --standalone`` with the family modules it names.
"""
from __future__ import annotations

from .aimv2 import FAMILY as AIMV2
from .dinov2 import FAMILY as DINOV2
from .encoder import Family
from .siglip import FAMILY as SIGLIP

FAMILIES: dict[str, Family] = {f.name: f for f in (SIGLIP, DINOV2, AIMV2)}

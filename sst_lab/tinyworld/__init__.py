"""The offline tiny world: a tiny pretrained Llama, its tokenizer, a tiny guard judge and demo data.

    from sst_lab.tinyworld import build_tiny_world
    world = build_tiny_world()          # built once under <repo>/.cache/tinyworld, then reused
    world.model, world.harmful_eval, ...

See docs/TINYWORLD.md.
"""

from sst_lab.tinyworld.build import TinyWorld, build_tiny_world, default_root, is_complete, recipe_hash
from sst_lab.tinyworld.world import refusal_detected

__all__ = ["TinyWorld", "build_tiny_world", "default_root", "is_complete", "recipe_hash", "refusal_detected"]

"""The pure core every layer builds on: config loading, registries, seeding, dtypes, images, hub access,
advantages, losses, EMA, step selection and the save/load contract of stateful parts.

Layering (``tests/test_layers.py`` enforces it): ``gen_rl.core`` imports nothing else of gen-rl; ``pipelines``
and ``rewards`` import only ``gen_rl.core``; ``gen_rl.algorithms`` imports the core; the trainers
(``gen_rl.trainer``, ``gen_rl.vlm``) sit above all of them.
"""

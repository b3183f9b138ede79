"""gpt-oss engine: checkpoints, reference model, Harmony chat format, sampling.

Kept import-light: `from kubrick.engine.api import …` never pulls torch; the heavy modules are imported
where they are used.
"""

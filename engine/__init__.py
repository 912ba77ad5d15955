"""umim engine: runs things (data, client actors, rounds, Ray Train, Ray Tune, checkpoints).

The public API grows with the engine; see ``engine.data`` for the data plane.
"""

__version__ = "0.1.0"

"""umim strategies: what clients are asked to do and how their results combine.

Nothing in this package imports Ray; the engine runs strategies, never the reverse.
"""

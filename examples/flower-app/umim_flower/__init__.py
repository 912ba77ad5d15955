"""umim's Flower app (the code is :mod:`engine.interop.flower_app`)."""

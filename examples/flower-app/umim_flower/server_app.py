"""The ``ServerApp``: FedAvg of umim's shared encoder, heads local, configured by the run
config's ``experiment`` YAML (:func:`engine.interop.flower_app.make_server_app`)."""

from pathlib import Path

from engine.interop.flower_app import make_server_app

app = make_server_app(app_dir=Path(__file__).resolve().parents[1])

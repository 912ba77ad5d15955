"""The ``ClientApp``: the experiment's client with the node's ``partition-id``, umim's own
:class:`~engine.fl.client.Client` (:func:`engine.interop.flower_app.make_experiment_client_app`)."""

from pathlib import Path

from engine.interop.flower_app import make_experiment_client_app

app = make_experiment_client_app(app_dir=Path(__file__).resolve().parents[1])

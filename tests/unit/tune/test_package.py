"""The sweep package's public names and its light imports."""

from __future__ import annotations

import subprocess
import sys

import engine.tune


def test_public_names_resolve_to_their_homes() -> None:
    from engine.tune import driver, outputs, result, schema

    homes = {"sweep": driver, "write_outputs": outputs, "load_sweep": schema,
             "SweepConfig": schema, "SearchConfig": schema, "trial_config": schema,
             "SweepResult": result}
    assert sorted(engine.tune.__all__) == sorted(homes)
    for name, module in homes.items():
        assert getattr(engine.tune, name) is getattr(module, name)
    assert set(engine.tune.__all__) <= set(dir(engine.tune))


def test_unknown_name_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = engine.tune.nope  # type: ignore[attr-defined]


def test_the_trainable_lives_in_an_importable_module() -> None:
    from engine.tune.trial import run_trial

    assert run_trial.__module__ == "engine.tune.trial"


def test_schema_and_the_package_do_not_import_ray() -> None:
    code = ("import sys, engine.tune, engine.tune.schema; "
            "engine.tune.load_sweep; engine.tune.SweepConfig; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"

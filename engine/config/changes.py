"""What changed between the config a run's state was made with and the one it resumes with.

``umim resume`` compares the two: a change the saved state cannot follow (the model, the
data, the strategy and its options, the seed, ...) is refused naming the keys; a change of
how the run is placed or stored is allowed; a change that only extends the run (more
baselines, baseline seeds or LODO domains; more rounds while nothing after the main run is
done) is allowed and recorded.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

PLACEMENT_PREFIXES = ("run.", "clients.")
"""Where and how a run is placed and stored: free to change on resume."""
PLACEMENT_KEYS = frozenset({
    "data.data_root", "data.cache_dir", "data.download",
    *(f"{section}.{knob}" for section in ("distill", "pretrain")
      for knob in ("num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker")),
})
APPENDABLE = frozenset({"evaluation.baselines", "evaluation.baseline_seeds",
                        "evaluation.lodo_domains"})
"""Lists whose new items only add steps."""
STEP_SWITCHES = frozenset({"evaluation.privacy_audit"})
"""Switches that only add (or leave out) a step after every other: free to change (turned
on after the main run, the audit has no kept teachers to attack and says so)."""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not name.endswith(("extra_domains",
                                                                       "options")):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for every leaf that differs (plain-data configs)."""
    a, b = flatten(before), flatten(after)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def classify_changes(changes: Mapping[str, tuple[Any, Any]], done_steps: Collection[str]
                     ) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """Split ``changes`` into (allowed, refused key -> why) for a run whose ``done_steps``
    (``main``, ``finetune``, ``baseline-...``) are finished."""
    allowed: dict[str, tuple[Any, Any]] = {}
    refused: dict[str, str] = {}
    later = [s for s in done_steps if s != "main"]
    for key, (old, new) in changes.items():
        if key.startswith(PLACEMENT_PREFIXES) or key in PLACEMENT_KEYS | STEP_SWITCHES:
            allowed[key] = (old, new)
        elif key in APPENDABLE:
            old_list, new_list = list(old or []), list(new or [])
            if new_list[:len(old_list)] == old_list:
                allowed[key] = (old, new)
            else:
                refused[key] = "items may only be appended"
        elif key == "strategy.rounds":
            if not (isinstance(old, int) and isinstance(new, int) and new > old):
                refused[key] = "rounds may only grow"
            elif later:
                refused[key] = f"steps after the main run are done ({', '.join(sorted(later))})"
            else:
                allowed[key] = (old, new)
        else:
            refused[key] = "the saved state depends on it"
    return allowed, refused


def describe_refusal(refused: Mapping[str, str], changes: Mapping[str, tuple[Any, Any]]
                     ) -> str:
    """One line naming every refused key with its old and new value and why."""
    parts = [f"{k} ({changes[k][0]!r} -> {changes[k][1]!r}: {why})" for k, why in refused.items()]
    return ("the run's config was changed in ways its saved state cannot follow: "
            + "; ".join(parts) + ". Restore those keys in config.yaml, or start a new run.")

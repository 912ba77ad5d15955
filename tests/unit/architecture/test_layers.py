"""The layers of the tree: each package imports only from the layers below it.

Read from the source (every ``import``, also inside functions; type-only imports under
``if TYPE_CHECKING:`` do not count), so a new import that breaks the order fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

LAYERS: list[tuple[str, ...]] = [
    ("strategies",),                      # pure algorithms: no Ray, no engine
    ("engine.records",),                  # storage, checkpoints, history, results, report
    ("engine.data",),                     # datasets -> unified shards
    ("engine.nn",),                       # networks, metrics
    ("engine.config",),                   # the validated config tree, plugins
    ("engine.fl",),                       # the Ray-free runtime: Client, round loop
    ("engine.cluster",),                  # Ray placement: connect, resources, actors, pool
    ("engine.train",),                    # Ray Train jobs: launch, MIM, distillation
    ("engine.run",),                      # session, study, build_simulation, plan
    ("engine.tune", "engine.interop"),    # sweeps; Flower
    ("engine.bench",),                    # benchmarks (imported only by the CLI)
    ("engine.cli", "umim"),               # the command line and the public API
]
RAY_FREE = ("strategies", "engine.data", "engine.nn", "engine.config", "engine.records",
            "engine.fl")
THIRD_PARTY_RAY = ("ray",)


def _package(module: str) -> str | None:
    """The layer package of ``module`` (``None`` for third-party and the ``engine`` root)."""
    for layer in LAYERS:
        for pkg in layer:
            if module == pkg or module.startswith(pkg + "."):
                return pkg
    return None


def _rank(pkg: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if pkg in layer)


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every runtime import in ``path``."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    module = _module_name(path)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + (path.name == "__init__.py")]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names
                    if _package(f"{name}.{alias.name}") not in (None, _package(name))]
    return out


def _sources() -> list[Path]:
    files = sorted((REPO / "engine").rglob("*.py")) + sorted((REPO / "strategies").rglob("*.py"))
    return [*files, REPO / "umim.py"]


def test_every_module_belongs_to_a_layer() -> None:
    orphans = [str(p.relative_to(REPO)) for p in _sources()
               if _package(_module_name(p)) is None and _module_name(p) != "engine"]
    assert orphans == [], f"modules outside every layer: {orphans}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path) -> None:
    own = _package(_module_name(path))
    if own is None:  # the `engine` package root: lazy re-exports of the public API
        return
    wrong = []
    for line, name in imports_of(path):
        if own == "umim" and name == "engine":  # the public API re-exports the version
            continue
        if name == "engine" or (name.startswith("engine.") and _package(name) is None):
            wrong.append(f"line {line}: imports the engine root {name!r}")
            continue
        target = _package(name)
        if target is None or target == own:
            if own in RAY_FREE and name.split(".")[0] in THIRD_PARTY_RAY:
                wrong.append(f"line {line}: {own} must not import Ray ({name})")
            continue
        if _rank(target) >= _rank(own):
            wrong.append(f"line {line}: {own} (layer {_rank(own)}) imports {name} "
                         f"(layer {_rank(target)})")
    assert wrong == [], "\n".join(wrong)


def _top_level_modules_after(imports: str) -> set[str]:
    """The top-level packages loaded by a fresh interpreter after ``import <imports>``."""
    code = f"import sys, {imports}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return set(ast.literal_eval(out.stdout.strip()))


def test_strategies_never_import_ray_or_the_engine_at_run_time() -> None:
    assert _top_level_modules_after("strategies, strategies.factory") & {"ray", "engine"} == set()


def test_the_ray_free_runtime_loads_without_ray() -> None:
    loaded = _top_level_modules_after("engine.fl.simulation, engine.fl.client, engine.config, "
                                      "engine.records.report")
    assert "ray" not in loaded


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The rule can fail: an upward import in a low layer is reported."""
    bad = REPO / "engine" / "nn" / "_layer_probe_tmp.py"
    bad.write_text("def f():\n    from engine.run.session import Session\n    return Session\n")
    try:
        with pytest.raises(AssertionError, match=r"engine\.nn .* imports engine\.run\.session"):
            test_imports_point_down(bad)
    finally:
        bad.unlink()

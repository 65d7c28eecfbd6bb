"""The import graph of ``diffusion_jax``: no cycle (function-level imports included) and every
import pointing down the layers of shared/DESIGN.md."""

import ast
import importlib
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffusion_jax")

# Lower layers never import higher ones; a module may import its own layer (no cycle).
LAYERS = {
    "math core": (
        "schedules",
        "likelihood",
        "samplers",
        "timesteps",
        "discrete",
        "diffusion",
        "vdm",
        "ode",
        "score",
        "distill",
    ),
    "infrastructure": (
        "sharding",
        "reporting",
        "data",
        "input_pipeline",
        "checkpoints",
        "cpu",
        "distributed",
        "workdir_lock",
        "interrupts",
        "safe_arrays",
        "files",
    ),
    "models": ("models",),
    "recipes": ("objectives", "optim", "sampling"),
    "system": ("config", "evaluation", "train", "distill_train"),
    "entry points": ("main", "benchmark", "cli", "prepare_data", "import_weights"),
}
pytestmark = pytest.mark.smoke

RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}


def module_names() -> dict[str, str]:
    """dotted name (without the package) -> file path, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel) or "__init__"] = os.path.join(folder, f)
    return out


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that a file imports anywhere in it (top level or in functions):
    ``from diffusion_jax.a import b`` counts as a.b where that is a module, else as a."""

    def resolve(name: str) -> str | None:
        name = name.removeprefix("diffusion_jax.")
        while name and name not in modules:  # models.unet.UNet -> models.unet
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {resolve(n) for n in names if n.startswith("diffusion_jax.")} - {None}
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    edges = graph()
    assert edges["evaluation"] >= {"evaluation.bpd", "config"}  # the parser sees imports
    assert find_cycle(edges) is None, find_cycle(edges)


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    if top not in RANK:
        pytest.fail(f"diffusion_jax.{module} is in no layer of LAYERS: add it to one.")
    return RANK[top]


def test_imports_point_down_the_layers():
    bad = [
        f"{m} ({layer_of(m)}) imports {i} ({layer_of(i)})"
        for m, targets in graph().items()
        if m != "__init__"
        for i in targets
        if layer_of(i) > layer_of(m)
    ]
    assert not bad, bad


def test_every_module_imports():
    """Each module of the package imports with the installed versions (CI's Python 3.12 leg:
    the newest jax, flax, optax and orbax that setup.cfg admits). The entry points define their
    absl flags when imported, so two of them cannot share a process: each runs as a program in
    this tier instead (``python -m diffusion_jax.main / benchmark / import_weights /
    prepare_data``: test_main, test_benchmark, test_import_weights, test_prepare_data)."""
    names = sorted(m for m in module_names() if m.split(".")[0] not in LAYERS["entry points"])
    assert len(names) > 40 and "models.unet" in names, names
    for name in names:
        importlib.import_module("diffusion_jax" if name == "__init__" else f"diffusion_jax.{name}")

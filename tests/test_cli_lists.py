"""`symzoo tasks` and `symzoo archs` show every task and architecture, each with its symmetry."""

from typer.testing import CliRunner

from pipeline.cli import app

TASKS = ["digits", "mnist", "fashion_mnist", "cifar10", "o5_regression", "inertia", "modified_inertia", "lorentz",
         "convex_hull", "nbody"]
ARCHS = ["mlp", "cnn_s", "cnn", "resnet20", "set_mlp", "p4cnn", "p4mcnn", "deepsets", "egnn", "scalar_mlp",
         "inertia_head", "frame_avg"]


def test_tasks_lists_every_task_with_its_group():
    r = CliRunner().invoke(app, ["tasks"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines() if line.strip()}
    for name in TASKS:
        assert name in lines, f"{name} missing from `symzoo tasks`"
    assert "O(1,3)" in lines["lorentz"] and "C4" in lines["digits"]


def test_archs_lists_every_architecture_equivariant_first():
    from zoos.archs import ARCHS as REGISTRY

    r = CliRunner().invoke(app, ["archs"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: i for i, line in enumerate(r.output.splitlines()) if line.strip()}
    for name in ARCHS:
        assert name in rows, f"{name} missing from `symzoo archs`"
    last_equivariant = max(rows[n] for n, info in REGISTRY.items() if info.equivariant)
    first_baseline = min(rows[n] for n, info in REGISTRY.items() if not info.equivariant)
    assert last_equivariant < first_baseline, "equivariant architectures are listed first"


def test_help_names_the_commands():
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("run", "validate", "tasks", "archs", "ls", "query", "import"):
        assert cmd in r.output

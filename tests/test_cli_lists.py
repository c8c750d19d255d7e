"""`symzoo tasks` and `symzoo archs` show every task and architecture, each with its symmetry."""

from typer.testing import CliRunner

from pipeline.cli import app

TASKS = ["digits", "mnist", "fashion_mnist", "cifar10", "svhn", "o5_regression", "inertia", "modified_inertia", "lorentz",
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


def test_version_and_help_that_reads_plainly():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("symzoo ")
    for cmd in (["run", "--help"], ["archs", "--help"], ["--help"]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 0 and "<bool>" not in r.output, r.output
    assert "--plain" in CliRunner().invoke(app, ["run", "--help"]).output


def test_archs_say_which_population_program_runs_each_on_a_gpu():
    """Decided on a template, so a CPU machine says what a GPU would run: every family has a population
    program (no vmap fallback), the group CNNs on popconv with their kernel expansion as a prologue."""
    from zoos.archs import ARCHS as REGISTRY

    r = CliRunner().invoke(app, ["archs", "--programs"])
    assert r.exit_code == 0, r.output
    assert "vmap (" not in r.output
    sections = r.output.split("\n\n")
    p4 = next(s for s in sections if s.startswith("p4cnn ("))
    assert "popconv" in p4 and "prologue" in p4 and "poplinear" in p4
    assert "the optimizer step" in p4 and "popoptim" in p4  # on the population kernels, as a GPU runs it
    frames = next(s for s in sections if s.startswith("frame_avg ("))  # eigh reads its status on the host
    assert "steps not replayed as CUDA graphs (linalg_eigh" in frames.replace("\n", "")
    assert all(any(s.startswith(f"{name} (") for s in sections) for name in REGISTRY)


def test_one_task_or_architecture_shows_what_a_study_may_set():
    """`symzoo tasks NAME` lists the task's options, what each allows and its default; `symzoo archs NAME` the
    architecture's config fields with their defaults and its program layer by layer; an unknown name is one line."""
    r = CliRunner().invoke(app, ["tasks", "digits"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines()[1:] if line.strip()}
    assert rows["group"][1:] == ["C4,", "D4", "C4"] and rows["variant"][-1] == "upright" and rows["n_train"][-1] == "1197"
    r = CliRunner().invoke(app, ["archs", "cnn"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines()[1:] if line.strip()}
    assert rows["width"][1] == "32" and rows["depth"][1] == "4" and rows["activation"][1] == "'relu'"
    assert "example task: mnist" in r.output and "popconv" in r.output and "the optimizer step" in r.output
    for args, says in ((["tasks", "nope"], "unknown task 'nope'; tasks: cifar10, "),
                       (["archs", "nope"], "unknown architecture 'nope'; architectures: canon_cnn, ")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output

"""The `symzoo` command line: list what exists, run studies, query stores."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="symzoo",
    help=(
        "Train model zoos of equivariant and baseline networks, store every weight in Arrow/Parquet, "
        "and analyse them: permutation matching, mode connectivity, symmetry and landscape metrics."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| tee`) gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr and exit (2: bad input, 1: a check failed)."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@app.command("tasks")
def tasks_cmd() -> None:
    """List the tasks, each with its symmetry group."""
    from tasks import TASKS

    table = Table("task", "group", "description", box=None, header_style="bold")
    for name in sorted(TASKS):
        info = TASKS[name]
        table.add_row(name, info.group, info.description)
    console.print(table)


@app.command("archs")
def archs_cmd() -> None:
    """List the architectures: equivariant or baseline, the symmetry respected, inputs taken."""
    from zoos.archs import ARCHS

    table = Table("architecture", "kind", "symmetry", "inputs", "description", box=None, header_style="bold")
    for name in sorted(ARCHS, key=lambda n: (not ARCHS[n].equivariant, n)):
        info = ARCHS[name]
        kind = "[green]equivariant[/]" if info.equivariant else "baseline"
        table.add_row(name, kind, info.symmetry, "/".join(info.input_kinds), info.description)
    console.print(table)


# Command groups live in their own modules; importing them registers their commands on `app`.
from pipeline import cmd_store  # noqa: E402,F401
from pipeline import cmd_run  # noqa: E402,F401
from pipeline import cmd_report  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

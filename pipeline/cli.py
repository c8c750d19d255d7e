"""The `symzoo` command line: list what exists, run studies, query stores."""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table


class _OneLineUsageErrors(typer.core.TyperGroup):
    """The command group, whose usage errors (an unknown option or command, a missing or extra argument) end in
    one line on stderr naming the command's --help, exit code 2, as symzoo's own errors do (`fail`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = getattr(typer.core, "_click", None) or importlib.import_module("click")  # typer >= 0.29 vendors click
        no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 raises it for a bare command
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except no_args_help as e:  # bare `symzoo`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "symzoo"
            _print_error(f"{e.format_message()} (see {where} --help)")
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # without standalone mode, click returns an Exit's code


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="symzoo",
    help=(
        "Train model zoos of equivariant and baseline networks, store every weight in Arrow/Parquet, "
        "and analyse them: permutation matching, mode connectivity, symmetry and landscape metrics."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: typer's rich panels label every flag <bool>
)
# Piped output (CI logs, `| tee`) gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"symzoo {version('symzoo')}")
        except PackageNotFoundError:  # run from a checkout without installing (python -m pipeline)
            typer.echo("symzoo (not installed: a checkout)")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """Train model zoos of equivariant and baseline networks, store every weight in Arrow/Parquet, and analyse
    them: permutation matching, mode connectivity, symmetry and landscape metrics."""


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error to stderr (a line each where the message lists several problems) and exit (2: bad
    input, 1: a check failed). The message is printed as it is (no Rich markup: a study named `[/x]` or an example
    such as `{choice: [relu, gelu]}` stays literal)."""
    _print_error(message)
    raise typer.Exit(code)


def _print_error(message: str) -> None:
    """`error: message` on stderr; a message of several problems, a line each, gets `error:` on each line."""
    from rich.text import Text

    console = Console(stderr=True, soft_wrap=True)
    for line in str(message).splitlines() or [""]:
        console.print(Text.assemble(("error:", "bold red"), " ", line), highlight=False)


def first_line(e: BaseException) -> str:
    """The first line of the exception's own message (at most 400 characters: a cloud client's can be pages)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:400]


def _user_errors() -> tuple[type, ...]:
    """The errors symzoo raises for bad input or a damaged store: each message says what and what to do."""
    from pipeline.phases import PhaseError
    from pipeline.runner import RunRefused, StageConfigError
    from pipeline.study import StudyError
    from pipeline.tracking import TrackingError
    from tasks.base import TaskError
    from zoos.archs.base import ArchError
    from zoos.spec import SpecError
    from zoos.store import StoreError

    return (PhaseError, StageConfigError, RunRefused, StudyError, TrackingError, TaskError, ArchError, SpecError, StoreError)


def command(name: str, **kwargs):
    """`app.command(name)` whose bad-input and damaged-store errors, and failed file operations, end in one line
    naming the file or value (exit 2) instead of a traceback."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kw):
            try:
                return fn(*args, **kw)
            except (typer.Exit, typer.Abort):
                raise
            except OSError as e:  # a folder that does not exist, a full disk, no permission
                fail(f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else f"{type(e).__name__}: {first_line(e)}")
            except Exception as e:
                if isinstance(e, _user_errors()):
                    fail(str(e))
                raise

        return app.command(name, **kwargs)(wrapped)

    return deco


def _unknown(what: str, name: str, names: list[str]) -> None:
    fail(f"unknown {what} {name!r}; {what}s: {', '.join(sorted(names))}")


def _task_defaults(info) -> dict:
    """A task's option defaults: its factory's keyword defaults, then those of the task class it builds (built
    with no options where that works, else the class its factory names) and of that class's bases."""
    import inspect
    import typing

    def keyword_defaults(fn) -> dict:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return {}
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    try:
        made = type(info.factory())
    except Exception:  # noqa: BLE001 - a task that needs its data files: the class its factory names
        try:
            made = typing.get_type_hints(info.factory).get("return")
        except Exception:  # noqa: BLE001 - an annotation that does not resolve: the factory's own defaults only
            made = None
    defaults = keyword_defaults(info.factory)
    for cls in made.__mro__ if inspect.isclass(made) else ():
        for k, v in keyword_defaults(cls.__init__).items():
            defaults.setdefault(k, v)
    return defaults


@command("tasks")
def tasks_cmd(name: Optional[str] = typer.Argument(None, help="a task: its options, what each allows, defaults")) -> None:
    """List the tasks, each with its symmetry group; with a NAME, that task's options."""
    from tasks import TASKS

    if name is not None:
        if name not in TASKS:
            _unknown("task", name, list(TASKS))
        info = TASKS[name]
        defaults = _task_defaults(info)
        console.print(f"[bold]{name}[/] (group {info.group}): {info.description}", highlight=False)
        table = Table("option", "allowed", "default", box=None, header_style="bold")
        for option, allowed in info.options.items():
            shown = ", ".join(map(str, allowed)) if isinstance(allowed, (tuple, list)) else getattr(allowed, "__name__", str(allowed))
            table.add_row(option, shown, "-" if defaults.get(option) is None else str(defaults[option]))
        console.print(table if info.options else "no options")
        if info.options and any(defaults.get(o) is None for o in info.options):
            console.print("[dim]-: none to show here (the task's own: its data's sizes, no data folder)[/]")
        return
    table = Table("task", "group", "description", box=None, header_style="bold")
    for task in sorted(TASKS):
        info = TASKS[task]
        table.add_row(task, info.group, info.description)
    console.print(table)
    console.print("[dim]symzoo tasks NAME: a task's options[/]")


_UPDATES = {"popoptim": "two Triton launches for all parameter tensors (zoos.popoptim)", "eager": "torch ops, ~20 a parameter tensor",
            "compiled": "torch.compile of the update"}  # what `archs --programs` says of each optimizer step


@command("archs")
def archs_cmd(
    name: Optional[str] = typer.Argument(None, help="an architecture: its config fields and defaults, its program"),
    programs: bool = typer.Option(False, "--programs", help="also say which population program runs each layer on a GPU"),
) -> None:
    """List the architectures: equivariant or baseline, the symmetry respected, inputs taken, and how a
    population of each trains on a GPU (its default config on its example task); with a NAME, that architecture's
    config fields, defaults and program, layer by layer."""
    from zoos.archs import ARCHS

    if name is not None:
        if name not in ARCHS:
            _unknown("architecture", name, list(ARCHS))
        info = ARCHS[name]
        kind = "equivariant" if info.equivariant else "baseline"
        console.print(f"[bold]{name}[/] ({kind}; symmetry {info.symmetry}; inputs {'/'.join(info.input_kinds)}): "
                      f"{info.description}", highlight=False)
        table = Table("config", "default", box=None, header_style="bold")
        for field, default in info.defaults.items():
            table.add_row(field, repr(default) if isinstance(default, str) else str(default))
        console.print(table if info.defaults else "no config fields")
        task, options = info.example_task
        console.print(f"example task: {task} {options or ''}".rstrip(), highlight=False)
        program = _gpu_program(name)
        if isinstance(program, str):
            console.print(f"on a GPU: {program}", highlight=False)
            return
        console.print(f"on a GPU: {program.describe()}", highlight=False)
        for layer, op, why in program.layers:
            console.print(f"  {layer:48s} {op:24s} {why}", highlight=False)
        console.print(f"  {'the optimizer step':48s} {program.optimizer:24s} {_UPDATES[program.optimizer]}")
        return
    table = Table("architecture", "kind", "symmetry", "inputs", "on a GPU", "description", box=None, header_style="bold")
    details = []
    for arch in sorted(ARCHS, key=lambda n: (not ARCHS[n].equivariant, n)):
        info = ARCHS[arch]
        kind = "[green]equivariant[/]" if info.equivariant else "baseline"
        program = _gpu_program(arch)
        path = program if isinstance(program, str) else program.describe()
        table.add_row(arch, kind, info.symmetry, "/".join(info.input_kinds), path, info.description)
        if programs and not isinstance(program, str):
            details.append((arch, program))
    console.print(table)
    if not programs:
        console.print("[dim]symzoo archs NAME: an architecture's config fields, defaults and program[/]")
    for name, program in details:
        console.print(f"\n[bold]{name}[/] ({program.describe()})")
        for layer, op, why in program.layers:
            console.print(f"  {layer:48s} {op:24s} {why}")
        console.print(f"  {'the optimizer step':48s} {program.optimizer:24s} {_UPDATES[program.optimizer]}")


def _gpu_program(arch: str):
    """The program a CUDA population of `arch` (default config, example task) runs, or why it could not be asked."""
    from tasks import get_task
    from zoos.archs import ARCHS, build_arch
    from zoos.functional import template
    from zoos.program import choose_program

    info = ARCHS[arch]
    try:
        task = get_task(info.example_task[0], **info.example_task[1])
        module = template(build_arch(arch, task))
    except Exception as e:  # noqa: BLE001 - a task that cannot be built here says so in its cell
        return f"(not checked: {e})"
    # the program's structure is decided on a template: no GPU needed to say what a GPU would run
    return choose_program(module, task, "cuda", "bf16", arch=arch, kernels=True, compile=False, dropout=False, warn=False)


# Command groups live in their own modules; importing them registers their commands on `app`.
from pipeline import cmd_store  # noqa: E402,F401
from pipeline import cmd_run  # noqa: E402,F401
from pipeline import cmd_report  # noqa: E402,F401


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()

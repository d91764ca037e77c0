"""The `qkv` command. Each subcommand lives in its own module of this package and is a thin
shell over library calls; a module joins the command by defining `register(app)`. Modules whose
names start with "_" hold shared helpers.

The subcommand modules import torch and the library inside their functions, so that
`qkv --help`, `qkv --version` and usage errors answer at once.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from qkv.cli._errors import one_line

# The parser's exception classes, whether typer ships its own click or uses the package.
_BASES = {c.__name__: c for c in typer.BadParameter.__mro__}
ClickException, UsageError = _BASES["ClickException"], _BASES["UsageError"]


class PlainUsage(TyperCommand):
    """A subcommand whose usage line names a required argument as click does (FILE), not as
    typer's {FILE}."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece[1:-1] if piece[:1] == "{" and piece[-1:] == "}" else piece
                for piece in super().collect_usage_pieces(ctx)]


class UsageErrorsOnOneLine(TyperGroup):
    """A usage error (unknown option, bad value) prints one `error:` line and exits 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as e:
            code = e.exit_code
            if e.format_message():  # empty when `qkv` alone has shown the help
                where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
                print(f"error: {one_line(e.format_message())}{where}", file=sys.stderr)
        except ClickException as e:
            print(f"error: {one_line(e.format_message())}", file=sys.stderr)
            code = e.exit_code
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            code = 130
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="qkv",
    cls=UsageErrorsOnOneLine,
    help="Exact attention in linear memory, and the Transformer built on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import qkv

        typer.echo(f"qkv {qkv.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print qkv's version and exit")] = False,
) -> None:
    """Exact attention in linear memory, and the Transformer built on it."""


def _register_subcommands() -> None:
    import qkv.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("main", "__main__") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"qkv.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = PlainUsage


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

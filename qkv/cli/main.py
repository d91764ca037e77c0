"""The `qkv` command. Each subcommand lives in its own module of this package and is a thin
shell over library calls; a module joins the command by defining `register(app)`."""

from __future__ import annotations

import importlib
import pkgutil

import typer

app = typer.Typer(
    name="qkv",
    help="Exact attention in linear memory, and the Transformer built on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
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


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

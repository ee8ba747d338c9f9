"""The ``tuneloop`` command line.

Contract
--------
* Each area owns its commands in ``<package>/cli.py`` with a function
  ``register(subparsers)`` that adds parsers and sets ``handler=fn(args, ctx) -> int``
  via ``set_defaults``. Those modules import only light things at module level
  (argparse, config dataclasses): torch, vLLM and Litestar are imported inside
  handlers so ``tuneloop --help`` stays fast.
* Global options: ``--config FILE`` (settings YAML), ``--set section.key=value``
  (repeatable), ``--home DIR`` (shorthand for ``--set paths.home=DIR``; a later
  ``--set paths.home=...`` wins). Handlers receive a :class:`Context` with the
  loaded settings and the database handle; nothing is written to ``os.environ``.
* A :class:`~tuneloop.errors.UserError` (bad config, unknown version, bad input
  file ...) prints ``error: <message>`` and exits 2; so does a command that needs
  the ML stack (torch, vLLM, TRL ...) in an install without the ``cpu``/``gpu``
  extra, naming the extra to install: the commands in :data:`ML_COMMANDS` are
  checked before they start (nothing written), others when the import fails.
  Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from tuneloop import __version__
from tuneloop.errors import UserError

if TYPE_CHECKING:
    from tuneloop.db import Database
    from tuneloop.settings import Settings

# area modules, in the order their commands appear in --help
AREAS = (
    "tuneloop.trainer.cli",
    "tuneloop.server.cli",
    "tuneloop.monitoring.cli",
    "tuneloop.feedback.cli",
    "tuneloop.deploy.cli",
)
# Third-party packages that come only with the `cpu` or `gpu` extra.
ML_STACK = frozenset({"torch", "vllm", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf"})
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INSTALL_HINT = f'install one extra: pip install "tuneloop[cpu]" --extra-index-url {TORCH_CPU_INDEX}  or  pip install "tuneloop[gpu]"'
_TRAIN_STACK = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")
# Commands that need the ML stack, checked before they start (so none fails half-way, after writing something,
# on a missing package); keyed by "command" or "group subcommand". Other commands that import a package of
# the stack lazily are caught by main's ModuleNotFoundError handler, with the same message.
ML_COMMANDS: dict[str, tuple[str, ...]] = {
    "train": _TRAIN_STACK,
    "tune": (*_TRAIN_STACK, "optuna"),
    "merge": ("torch", "transformers", "peft"),
    "export model": ("torch", "transformers", "peft"),
    "serve": ("vllm", "torch", "transformers"),
    "eval": ("torch", "transformers", "peft", "datasets"),
    "deploy gate": ("torch", "transformers", "peft", "datasets"),
    "loop": _TRAIN_STACK,
    "demo": (*_TRAIN_STACK, "vllm"),
}


@dataclass
class Context:
    """What every command handler gets: settings and the database, built lazily."""

    config_path: str | None
    overrides: list[str]

    @cached_property
    def settings(self) -> Settings:
        from tuneloop.settings import load_settings

        return load_settings(self.config_path, self.overrides)

    @cached_property
    def db(self) -> Database:
        return self.settings.database.open(self.settings.paths)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tuneloop",
        description=(
            "Fine-tune open LLMs, serve them behind an OpenAI-compatible API, watch them in "
            "production and retrain them from what production teaches."
        ),
        epilog="Run `tuneloop <command> --help` for each command. Docs: README.md",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tuneloop {__version__}")
    p.add_argument("--config", metavar="FILE", help="settings YAML (default: $TUNELOOP_CONFIG or ./tuneloop.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set server.port=9000 (repeatable)",
    )
    p.add_argument(
        "--home", metavar="DIR", help="data folder (database, datasets, runs); default $TUNELOOP_HOME or ./.tuneloop"
    )
    sub = p.add_subparsers(dest="command", metavar="<command>")
    _register_config(sub)
    for name in AREAS:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        # a group without a sub-command: show that group's help
        (getattr(args, "group_parser", None) or parser).print_help()
        return 0 if args.command is None else 2
    overrides = ([f"paths.home={args.home}"] if args.home else []) + list(args.overrides)
    ctx = Context(args.config, overrides)
    command = " ".join(x for x in (args.command, getattr(args, f"{args.command}_command", None)) if x)
    missing = _missing_ml_package(args, command)
    if missing:
        print(
            f"error: `tuneloop {command}` needs the ML stack (no module named {missing!r}); {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    try:
        return int(handler(args, ctx) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        # ModuleNotFoundError (not installed) or ImportError (a broken or mismatched install) of the ML stack
        if (e.name or "").split(".")[0] not in ML_STACK:
            raise
        print(f"error: `tuneloop {command}` needs the ML stack ({e}); {INSTALL_HINT}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _missing_ml_package(args: argparse.Namespace, command: str) -> str | None:
    """The first package of the ML stack ``command`` needs that is not installed, else None (no import)."""
    import importlib.util

    needs = ML_COMMANDS.get(command, ())
    if command == "train" and getattr(args, "write_config", None):
        needs = ()  # only resolves and writes the config file
    for name in needs:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            return name
    return None


def _register_config(sub: argparse._SubParsersAction) -> None:
    g = add_group(sub, "config", "show the effective settings and every settings key with its help")
    c = g.add_parser("show", help="print the effective settings (defaults < YAML < env < --set) as YAML")
    c.set_defaults(handler=_cmd_config_show)
    c = g.add_parser("keys", help="list every settings key with its help and default")
    c.set_defaults(handler=_cmd_config_keys)


def _cmd_config_show(args: argparse.Namespace, ctx: Context) -> int:
    import yaml

    from tuneloop.config import to_dict

    print(yaml.safe_dump(to_dict(ctx.settings), sort_keys=False).rstrip())
    return 0


def _cmd_config_keys(args: argparse.Namespace, ctx: Context) -> int:
    from tuneloop.config import field_help
    from tuneloop.settings import Settings

    for key, text in field_help(Settings).items():
        print(f"{key}\n    {text}")
    return 0


def add_group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """Add a command group (``tuneloop models ...``) and return its sub-parsers; a group another area already added
    (``tuneloop export``: ``model`` from the trainer, ``logs`` from monitoring) is returned as it is."""
    have = sub.choices.get(name)
    if have is not None:
        return next(a for a in have._actions if isinstance(a, argparse._SubParsersAction))
    gp = sub.add_parser(name, help=help, description=help)
    gp.set_defaults(group_parser=gp)
    return gp.add_subparsers(dest=f"{name}_command", metavar="<subcommand>")


if __name__ == "__main__":
    sys.exit(main())

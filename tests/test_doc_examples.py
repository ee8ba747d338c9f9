"""Every ``tuneloop ...`` example the user can read parses with the CLI's own argument parser.

Sources: the fenced code blocks of README.md and docs/*.md (lines starting with ``tuneloop``,
``$ tuneloop``, ``.venv/bin/tuneloop``, after environment assignments, inside ``$(...)``, after
``kubectl exec ... --`` and the image's entrypoint in ``docker run ... tuneloop:cpu``), every inline
code span that starts with ``tuneloop`` (its command path and ``--flags`` must exist), and the
epilog and description of every command of the CLI tree (walked in-process, no subprocess).

Nothing is executed: each example's argv goes through ``tuneloop.cli.build_parser().parse_args``,
then its ``key=value`` overrides (``train``, ``--set``, ``loop --train``) through the same config
builder the command uses, so a wrong setting or training key in an example fails too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneloop.cli import build_parser
from tuneloop.config import ConfigError, build, field_help, parse_overrides
from tuneloop.errors import UserError
from tuneloop.settings import Settings
from tuneloop.trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DUMMY = "1"  # stands for a placeholder such as <VERSION>: a valid name, number and path

_FENCE = re.compile(r"^\s*(```|~~~)")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SUBSHELL = re.compile(r"\$\((\s*(?:\S*/)?tuneloop\s[^)]*)\)")
_AFTER_DASHDASH = re.compile(r"\s--\s+(tuneloop\s.*)$")
_DOCKER_RUN = re.compile(r"^docker\s+run\s.*?\btuneloop:[\w.-]+\s+(.*)$")
_PAREN_NOTE = re.compile(r"\s{2,}\(.*\)\s*$")  # "tuneloop loop --cycle 01a2...   (resume)" in epilogs
_PLACEHOLDER = re.compile(r"<[A-Za-z_][\w-]*>")
_INLINE = re.compile(r"`((?:\.venv/bin/)?tuneloop\s[^`]+)`")


class ParseError(Exception):
    pass


@dataclass(frozen=True)
class Example:
    where: str  # "docs/serving.md:17" or "`tuneloop loop --help` epilog"
    text: str  # the command as written (continuations joined)
    argv: tuple[str, ...]  # what follows the program name


def _argv(command: str) -> list[str] | None:
    """argv of one shell command line (comments, env assignments and placeholders handled), or None
    when it is not a tuneloop command."""
    line = command.strip()
    if line.startswith("$ "):
        line = line[2:].lstrip()
    m = _SUBSHELL.search(line) or _AFTER_DASHDASH.search(line)
    docker = _DOCKER_RUN.match(line)
    if m:
        line = m.group(1)
    elif docker:
        line = "tuneloop " + docker.group(1)
    line = _PAREN_NOTE.sub("", line)
    line = _PLACEHOLDER.sub(DUMMY, line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:
        return [f"<unparseable shell: {e}>"]
    for i, t in enumerate(tokens):  # the command ends at a redirection, pipe or list operator (`> report.json`)
        if t and set(t) <= set("();<>|&"):
            del tokens[i:]
            break
    while tokens and _ENV.match(tokens[0]):
        tokens.pop(0)
    if not tokens or tokens[0].rsplit("/", 1)[-1] != "tuneloop":
        return None
    return [t for t in tokens[1:] if t not in ("...", "…")]  # "..." = "more arguments"


def _joined(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(index of the first line, text) with backslash continuations joined."""
    i = 0
    while i < len(lines):
        start, text = i, lines[i].rstrip()
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        yield start, text
        i += 1


def _is_candidate(text: str) -> bool:
    s = text.strip().removeprefix("$ ").lstrip()
    return bool(
        # a command, not an output row such as "tuneloop       0    6538 ..." in a results table
        re.match(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:\S*/)?tuneloop\s+[A-Za-z-]", s)
        or _SUBSHELL.search(s)
        or _AFTER_DASHDASH.search(s)
        or _DOCKER_RUN.match(s)
    )


def doc_examples() -> list[Example]:
    out = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        rel = path.relative_to(ROOT)
        block: list[str] = []
        start = 0
        fenced = False
        for n, line in enumerate(lines):
            if _FENCE.match(line):
                if fenced:
                    for i, text in _joined(block):
                        if _is_candidate(text):
                            argv = _argv(text)
                            if argv is not None:
                                out.append(Example(f"{rel}:{start + i + 1}", text.strip(), tuple(argv)))
                    block = []
                else:
                    start = n + 1
                fenced = not fenced
            elif fenced:
                block.append(line)
    return out


def inline_spans() -> list[Example]:
    """Inline `tuneloop ...` code spans outside fenced blocks (often templates: `tuneloop models list | show NAME`)."""
    out = []
    for path in DOCS:
        fenced = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _FENCE.match(line):
                fenced = not fenced
                continue
            if fenced:
                continue
            for m in _INLINE.finditer(line):
                out.append(Example(f"{path.relative_to(ROOT)}:{n}", m.group(1), tuple(m.group(1).split()[1:])))
    return out


def _walk(
    p: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _walk(sp, (*path, name))


def help_examples(parser: argparse.ArgumentParser) -> list[Example]:
    out = []
    for path, p in _walk(parser):
        for part, text in (("epilog", p.epilog), ("description", p.description)):
            for _, line in _joined((text or "").splitlines()):
                if not line.strip().startswith("tuneloop "):
                    continue
                argv = _argv(line)
                if argv is not None:
                    where = f"`{' '.join(('tuneloop', *path))} --help` {part}"
                    out.append(Example(where, line.strip(), tuple(argv)))
    return out


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The longest command path at the start of ``words`` and its parser."""
    path: list[str] = []
    p = parser
    for w in words:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or w not in subs[0].choices:
            break
        path.append(w)
        p = subs[0].choices[w]
    return path, p


def _check_overrides(ns: argparse.Namespace) -> None:
    """Run the example's key=value overrides through the builders the commands use."""
    try:
        if getattr(ns, "overrides", None):
            build(Settings, {}, list(ns.overrides))
        if ns.command == "train" and getattr(ns, "train_overrides", None):
            bad = [o for o in ns.train_overrides if "=" not in o]
            if bad:
                raise ParseError(f"train arguments must be key=value, got {bad}")
            build(TrainConfig, {}, list(ns.train_overrides))
        if ns.command == "loop" and getattr(ns, "train_overrides", None):
            keys = set(field_help(TrainConfig))

            def flat(d: dict, prefix: str = "") -> Iterator[str]:
                for k, v in d.items():
                    yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

            unknown = sorted(set(flat(parse_overrides(list(ns.train_overrides)))) - keys)
            if unknown:
                raise ParseError(f"--train: unknown training key(s) {unknown}")
    except (ConfigError, UserError) as e:
        raise ParseError(str(e)) from None


def parse(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> str | None:
    """None when ``argv`` parses (and its overrides build), else the error message."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ns = parser.parse_args(list(argv))
        _check_overrides(ns)
    except ParseError as e:
        return str(e)
    except SystemExit as e:  # --help / --version
        return None if e.code in (0, None) else f"exit {e.code}"
    return None


@pytest.fixture(scope="module")
def parser() -> Iterator[argparse.ArgumentParser]:
    def error(self: argparse.ArgumentParser, message: str) -> None:
        raise ParseError(f"{self.prog}: {message}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "error", error)
        yield build_parser()


def test_examples_are_found(parser: argparse.ArgumentParser) -> None:
    docs, helps = doc_examples(), help_examples(parser)
    assert len(docs) > 80, f"only {len(docs)} examples found in README.md and docs/*.md: is the extraction broken?"
    assert len(helps) > 15, f"only {len(helps)} examples found in the --help texts"
    # the extraction sees what it must: continuations, env assignments, $(...), placeholders
    assert _argv("$ KEY=$(tuneloop keys create --scope admin --name ops --quiet)   # x") == [
        "keys", "create", "--scope", "admin", "--name", "ops", "--quiet"
    ]  # fmt: skip
    assert _argv("A=1 .venv/bin/tuneloop train --nproc 8 method=full ...") == ["train", "--nproc", "8", "method=full"]
    assert _argv("tuneloop loop --cycle <ID>   (resume)") == ["loop", "--cycle", DUMMY]
    assert list(_joined(["tuneloop a \\", "   b", "c"])) == [(0, "tuneloop a  b"), (2, "c")]
    assert _argv("tuneloop eval a base --json > report.json  # b") == ["eval", "a", "base", "--json"]
    assert _argv("curl localhost:8000/v1/models") is None
    assert not _is_candidate("tuneloop       0    6538    264.3")


def test_every_example_parses(parser: argparse.ArgumentParser) -> None:
    failures = [
        f"{ex.where}: {ex.text}\n    -> {err}"
        for ex in doc_examples() + help_examples(parser)
        if (err := parse(parser, ex.argv)) is not None
    ]
    assert not failures, f"{len(failures)} example(s) do not parse:\n" + "\n".join(failures)


def test_inline_commands_and_flags_exist(parser: argparse.ArgumentParser) -> None:
    """`tuneloop <cmd> ... --flag` spans in prose: the command path and every --flag must exist."""
    global_opts = {o for a in parser._actions for o in a.option_strings}
    failures = []
    for ex in inline_spans():
        argv = list(ex.argv)
        while argv and argv[0].split("=", 1)[0] in ("--set", "--config", "--home"):  # global options first
            del argv[: 1 if "=" in argv[0] else 2]
        words = [w for w in argv if not w.startswith("-")]
        path, p = _subparser(parser, argv)
        if not path and words and not argv[0].startswith("-"):
            failures.append(f"{ex.where}: `{ex.text}` -> no command {words[0]!r}")
            continue
        opts = {o for a in p._actions for o in a.option_strings} | global_opts
        for tok in argv:
            flag = tok.split("=", 1)[0].rstrip(",.;:)]")
            if flag.startswith("--") and len(flag) > 2 and flag not in opts:
                failures.append(f"{ex.where}: `{ex.text}` -> `tuneloop {' '.join(path)}` has no {flag}")
    assert not failures, f"{len(failures)} inline command(s) name what the CLI lacks:\n" + "\n".join(failures)

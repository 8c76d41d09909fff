"""Shell completion scripts generated from the ``peerkit`` argument parser (internal, sans-IO).

``peerkit completion bash|zsh`` prints them. They are built by reading the parser (its
subcommands, their options and how many values each takes, their choices), so a new option
or subcommand is completed without anyone editing a script; no third-party completion
package is needed. Values are completed from ``choices`` (``--log-level``...) or from a
``suggestions`` attribute the parser sets on an action that accepts other values too
(``ctl``'s action), as file names when the metavar names a file (``FILE``, ``JSON``) and as
directories for ``DIR``; other values (URLs, peer ids) get no suggestion.

The readers use argparse's ``_actions`` and ``_SubParsersAction``: private names, but the
same ones every argparse completion tool relies on, stable since Python 3.2.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator

import attrs

__all__ = ["SHELLS", "bash_script", "zsh_script"]

SHELLS = ("bash", "zsh")

_FILE_METAVARS = {"FILE", "JSON"}
_DIR_METAVARS = {"DIR"}


@attrs.frozen
class _Option:
    names: tuple[str, ...]
    nargs: int  # values it takes: 0 (a flag), 1, 2...
    repeat: bool  # action="append" / "count": may be given several times
    help: str
    complete: str  # "" (nothing), "file", "dir" or "words"
    words: tuple[str, ...]  # the choices, when complete == "words"
    metavars: tuple[str, ...]


@attrs.frozen
class _Command:
    name: str
    help: str
    options: tuple[_Option, ...]
    positionals: tuple[_Option, ...]  # names empty; one entry per positional argument


def _nargs(action: argparse.Action) -> int:
    if isinstance(action.nargs, int):
        return action.nargs
    return 1


def _metavars(action: argparse.Action, count: int) -> tuple[str, ...]:
    meta = action.metavar
    if isinstance(meta, tuple):
        return tuple(str(m) for m in meta)
    name = str(meta) if meta is not None else action.dest.upper()
    return (name,) * max(count, 1)


def _what(action: argparse.Action, metavars: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    if action.choices is not None:
        return "words", tuple(str(c) for c in action.choices)
    suggested = getattr(action, "suggestions", None)  # values offered, others allowed too
    if suggested:
        return "words", tuple(str(c) for c in suggested)
    if metavars and metavars[-1] in _FILE_METAVARS:
        return "file", ()
    if metavars and metavars[-1] in _DIR_METAVARS:
        return "dir", ()
    return "", ()


def _short_help(action: argparse.Action) -> str:
    """The option's help, on one line, without its "(default: ...)"."""
    text = action.help or ""
    if text == argparse.SUPPRESS:
        return ""
    with contextlib.suppress(KeyError, TypeError, ValueError):  # %(default)s, as argparse
        text = text % {**vars(action), "prog": ""}
    text = re.sub(r"\s*\(default:[^()]*\)", "", text)
    return " ".join(text.split())


def _option(action: argparse.Action) -> _Option:
    count = _nargs(action)
    metavars = _metavars(action, count) if count else ()
    complete, words = _what(action, metavars)
    return _Option(
        names=tuple(action.option_strings),
        nargs=count,
        repeat=isinstance(action, argparse._AppendAction | argparse._CountAction),
        help=_short_help(action),
        complete=complete,
        words=words,
        metavars=metavars,
    )


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError("the parser has no subcommands")


def _commands(parser: argparse.ArgumentParser) -> Iterator[_Command]:
    sub = _subparsers(parser)
    helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    for name, subparser in sub.choices.items():
        options = []
        positionals = []
        for action in subparser._actions:
            if action.option_strings:
                options.append(_option(action))
            else:
                positionals.append(_option(action))
        yield _Command(name, helps.get(name, ""), tuple(options), tuple(positionals))


def _top_options(parser: argparse.ArgumentParser) -> list[_Option]:
    return [_option(a) for a in parser._actions if a.option_strings]


# ----------------------------------------------------------------------------------- bash


def _bash_words(words: tuple[str, ...] | list[str]) -> str:
    return " ".join(words)


def _bash_reply(complete: str, words: tuple[str, ...]) -> str:
    if complete == "words":
        return f'mapfile -t COMPREPLY < <(compgen -W "{_bash_words(words)}" -- "$cur")'
    if complete == "file":
        return 'compopt -o filenames; mapfile -t COMPREPLY < <(compgen -f -- "$cur")'
    if complete == "dir":
        return 'compopt -o filenames; mapfile -t COMPREPLY < <(compgen -d -- "$cur")'
    return "COMPREPLY=()"


def bash_script(parser: argparse.ArgumentParser, version: str = "") -> str:
    """A bash completion script for ``parser`` (``complete -F _peerkit peerkit``)."""
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    commands = list(_commands(parser))
    top = [n for o in _top_options(parser) for n in o.names]
    names = [c.name for c in commands]
    nargs_cases: list[str] = []
    value_cases: list[str] = []
    option_cases: list[str] = []
    positional_cases: list[str] = []
    for cmd in commands:
        for opt in cmd.options:
            keys = "|".join(f'"{cmd.name} {n}"' for n in opt.names)
            if opt.nargs:
                nargs_cases.append(f"        {keys}) echo {opt.nargs} ;;")
            if opt.nargs and opt.complete:
                value_cases.append(f"            {keys}) {_bash_reply(opt.complete, opt.words)} ;;")
        every = [n for o in cmd.options for n in o.names]
        option_cases.append(
            f'            {cmd.name}) mapfile -t COMPREPLY < <(compgen -W "{_bash_words(every)}"'
            ' -- "$cur") ;;'
        )
        for index, pos in enumerate(cmd.positionals):
            if pos.complete:
                reply = _bash_reply(pos.complete, pos.words)
                positional_cases.append(f'        "{cmd.name} {index}") {reply} ;;')
    lines = [
        f"# bash completion for {prog}, generated by `{prog} completion bash`"
        + (f" ({prog} {version})" if version else ""),
        f"# Install: {prog} completion bash > ~/.local/share/bash-completion/completions/{prog}",
        f'#     or: add  eval "$({prog} completion bash)"  to ~/.bashrc',
        "",
        f"{fn}_nargs() {{  # how many values option $2 of subcommand $1 takes",
        '    case "$1 $2" in',
        *nargs_cases,
        "        *) echo 0 ;;",
        "    esac",
        "}",
        "",
        f"{fn}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}"',
        '    local cmd="" opt="" w i=1 skip=0 npos=0',
        "    # the subcommand: the first word that is not an option",
        "    while (( i < COMP_CWORD )); do",
        '        w="${COMP_WORDS[i]}"',
        '        if [[ $w != -* ]]; then cmd="$w"; break; fi',
        "        (( i++ ))",
        "    done",
        "    if [[ -z $cmd ]]; then",
        f'        mapfile -t COMPREPLY < <(compgen -W "{_bash_words(top + names)}" -- "$cur")',
        "        return",
        "    fi",
        "    # the words after it: options (and the values they take) and positionals",
        "    (( i++ ))",
        "    while (( i < COMP_CWORD )); do",
        '        w="${COMP_WORDS[i]}"',
        "        if (( skip > 0 )); then",
        "            (( skip-- ))",
        "        elif [[ $w == -* ]]; then",
        f'            opt="$w"; skip=$({fn}_nargs "$cmd" "$w")',
        "        else",
        "            (( npos++ ))",
        "        fi",
        "        (( i++ ))",
        "    done",
        "    if (( skip > 0 )); then  # a value of $opt",
        '        case "$cmd $opt" in',
        *value_cases,
        "            *) COMPREPLY=() ;;",
        "        esac",
        "        return",
        "    fi",
        "    if [[ $cur == -* ]]; then",
        '        case "$cmd" in',
        *option_cases,
        "        esac",
        "        return",
        "    fi",
        '    case "$cmd $npos" in',
        *positional_cases,
        "        *) COMPREPLY=() ;;",
        "    esac",
        "}",
        "",
        f"complete -F {fn} {prog}",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- zsh


def _zsh_quote(text: str) -> str:
    """``text`` inside a single-quoted zsh word."""
    return text.replace("'", "'\\''")


def _zsh_desc(text: str) -> str:
    return _zsh_quote(text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]"))


def _zsh_meta(text: str) -> str:
    return _zsh_quote(text.replace("\\", "\\\\").replace(":", "\\:"))


def _zsh_action(complete: str, words: tuple[str, ...]) -> str:
    if complete == "words":
        return _zsh_quote("(" + " ".join(words) + ")")
    if complete == "file":
        return "_files"
    if complete == "dir":
        return "_files -/"
    return " "


def _zsh_values(opt: _Option) -> str:
    parts = []
    for i, meta in enumerate(opt.metavars):
        last = i == len(opt.metavars) - 1
        action = _zsh_action(opt.complete, opt.words) if last else " "
        parts.append(f":{_zsh_meta(meta)}:{action}")
    return "".join(parts)


def _zsh_specs(opt: _Option) -> Iterator[str]:
    for name in opt.names:
        prefix = "*" if opt.repeat else "(" + " ".join(opt.names) + ")"
        yield f"'{prefix}{name}[{_zsh_desc(opt.help)}]{_zsh_values(opt)}'"


def zsh_script(parser: argparse.ArgumentParser, version: str = "") -> str:
    """A zsh completion script for ``parser`` (a ``#compdef`` function file)."""
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    commands = list(_commands(parser))
    top_specs = [spec for o in _top_options(parser) for spec in _zsh_specs(o)]
    described = [f"'{_zsh_meta(c.name)}:{_zsh_quote(c.help)}'" for c in commands]
    cases: list[str] = []
    for cmd in commands:
        specs = [spec for o in cmd.options for spec in _zsh_specs(o)]
        for index, pos in enumerate(cmd.positionals, start=1):
            meta = pos.metavars[0] if pos.metavars else "ARG"
            action = _zsh_action(pos.complete, pos.words)
            specs.append(f"'{index}:{_zsh_meta(meta)}:{action}'")
        body = " \\\n                        ".join(specs)
        cases.append(
            f"                {cmd.name})\n                    _arguments \\\n"
            f"                        {body} && ret=0\n                    ;;"
        )
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}, generated by `{prog} completion zsh`"
        + (f" ({prog} {version})" if version else ""),
        f"# Install: {prog} completion zsh > ~/.zfunc/_{prog}, with  fpath=(~/.zfunc $fpath)",
        "#          before  autoload -Uz compinit && compinit  in ~/.zshrc",
        f"#     or: add  source <({prog} completion zsh)  to ~/.zshrc (after compinit)",
        "",
        f"{fn}() {{",
        "    local curcontext=$curcontext state line ret=1",
        "    typeset -A opt_args",
        "    _arguments -C \\",
        *(f"        {spec} \\" for spec in top_specs),
        "        '1: :->command' \\",
        "        '*:: :->args' && ret=0",
        "    case $state in",
        "        command)",
        "            local -a commands",
        "            commands=(",
        *(f"                {d}" for d in described),
        "            )",
        f"            _describe -t commands '{prog} command' commands && ret=0",
        "            ;;",
        "        args)",
        "            case $line[1] in",
        *cases,
        "            esac",
        "            ;;",
        "    esac",
        "    return ret",
        "}",
        "",
        f'if [[ "$funcstack[1]" == "{fn}" ]]; then',
        f'    {fn} "$@"',
        "else",
        f"    compdef {fn} {prog}",
        "fi",
        "",
    ]
    return "\n".join(lines)

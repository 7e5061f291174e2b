"""Settings declared once, as dataclass fields, and the command line made from them.

A field's type and default are the dataclass's; its ``metadata`` (:func:`cli`) holds
its help and the flag and ``MESHSERVE_<NAME>`` variable that set it, in the manner
of MLServer's settings with an env prefix. :func:`add_arguments` makes the flags
from a class, each with its variable (read when the parser is built) as default,
and :func:`from_args` builds the frozen object from the parsed flags, so a flag's
default and the class's cannot differ and the flag wins over the variable. Nothing
here reads the environment at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from meshserve.platform.tls import TlsConfig, TlsConfigError

ENV_PREFIX = "MESHSERVE_"

TLS_FLAGS = {
    "--tls-ca": "CA certificate",
    "--tls-cert": "this service's certificate",
    "--tls-key": "this service's private key",
}

S = TypeVar("S")


def env_default(name: str, default: Any) -> Any:
    """The value of ``MESHSERVE_<NAME>`` converted to ``default``'s type, or ``default``."""
    raw = os.environ.get(f"{ENV_PREFIX}{name}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return parse_bool(raw)
    if default is None:
        return raw
    return type(default)(raw)


def parse_bool(raw: str) -> bool:
    """A variable's text as a switch: 1, true, yes or on (any case) is on."""
    return raw.lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------ declaring


def cli(
    help: str,
    *,
    flag: str | None = "",
    env: str | None = "",
    choices: tuple[str, ...] | None = None,
    required_at_parse: bool = True,
) -> dict[str, Any]:
    """A settings field's ``metadata``: everything its flag and variable need.

    ``field(default=8001, metadata=cli("the public port", flag="--grpc-port"))``.
    ``flag`` defaults to ``--`` and the field's name in kebab case, ``env`` to the
    field's name in upper case (``MESHSERVE_`` is added); ``None`` means none (a field
    with neither is set only in code: an id a server makes, an interval tests shorten).
    A field without a default is required: at parse time unless its variable is set,
    or, with ``required_at_parse=False``, by :func:`from_args` when the service starts.
    """
    return {"help": help, "flag": flag, "env": env, "choices": choices, "required_at_parse": required_at_parse}


def tls_cli(help: str) -> dict[str, Any]:
    """``metadata`` of a ``TlsConfig | None`` field: the ``--tls-ca/--tls-cert/--tls-key``
    trio (``MESHSERVE_TLS_*``), all three or none; ``help`` says what it secures."""
    return {"tls": True, "help": help}


@dataclass(frozen=True, slots=True)
class Option:
    """One field's command-line face: resolved from its :func:`cli` metadata."""

    name: str
    flag: str | None
    env: str | None
    convert: Callable[[str], Any]
    is_bool: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None
    required_at_parse: bool
    repeated: bool = False  # a ``tuple[str, ...]`` field: the flag may be given again; the variable is comma-separated

    @property
    def dest(self) -> str:
        """The attribute argparse stores the flag's value under."""
        assert self.flag is not None
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def has_default(self) -> bool:
        return self.default is not dataclasses.MISSING

    def from_env(self, environ: Mapping[str, str]) -> Any:
        """The variable's value converted, or ``MISSING`` when unset (or no variable)."""
        raw = environ.get(f"{ENV_PREFIX}{self.env}") if self.env else None
        if raw is None:
            return dataclasses.MISSING
        if self.is_bool:
            return parse_bool(raw)
        if self.repeated:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        try:
            return self.convert(raw)
        except ValueError:
            raise SystemExit(f"{ENV_PREFIX}{self.env}={raw!r}: not a valid {self.name}") from None


def options(cls: type[Any]) -> dict[str, Option]:
    """Every settings field of ``cls`` but TLS, by name, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or meta.get("tls"):
            continue
        kind = _unoptional(hints[f.name])
        repeated = typing.get_origin(kind) is tuple
        if repeated:
            kind = typing.get_args(kind)[0]
        flag = meta["flag"]
        env = meta["env"]
        found[f.name] = Option(
            name=f.name,
            flag=("--" + f.name.replace("_", "-")) if flag == "" else flag,
            env=f.name.upper() if env == "" else env,
            convert=kind,
            is_bool=kind is bool,
            default=f.default,
            help=meta["help"],
            choices=meta["choices"],
            required_at_parse=meta["required_at_parse"],
            repeated=repeated,
        )
    return found


def _unoptional(hint: Any) -> Any:
    """``X`` for ``X | None``; a settings field holds one plain type."""
    if isinstance(hint, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kind
    return hint


def _tls_field(cls: type[Any]) -> dataclasses.Field[Any] | None:
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("tls")), None)


# ------------------------------------------------------------------ flags


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    *,
    only: Collection[str] | None = None,
    given_only: bool = False,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Add a flag for each of ``cls``'s settings (or ``only`` those), the variable as its default.

    ``given_only``: the flag has no default and is left off the namespace unless given,
    for a command that passes it on to a child (see :func:`forwarded_flags`); the
    child then reads the variable itself, as it inherits the environment.
    ``environ`` is ``os.environ`` unless given, read now, not at import.
    """
    env = os.environ if environ is None else environ
    for option in options(cls).values():
        if option.flag is None or (only is not None and option.name not in only):
            continue
        _add_option(parser, option, env, given_only)
    tls = _tls_field(cls)
    if tls is not None and (only is None or tls.name in only):
        _add_tls(parser, tls.metadata["help"], env, given_only)


def _add_option(parser: argparse.ArgumentParser, option: Option, env: Mapping[str, str], given_only: bool) -> None:
    assert option.flag is not None
    from_env = option.from_env(env)
    help_text = option.help
    if option.env:
        help_text = f"{help_text} ({ENV_PREFIX}{option.env})" if help_text else f"{ENV_PREFIX}{option.env}"
    kwargs: dict[str, Any] = {"help": help_text}
    if given_only:
        kwargs["default"] = argparse.SUPPRESS
        if option.has_default:
            kwargs["help"] = f"{help_text}; default {option.default}"
    elif from_env is not dataclasses.MISSING:
        kwargs["default"] = from_env
    elif option.has_default:
        kwargs["default"] = option.default
    else:
        kwargs["default"] = None
        kwargs["required"] = option.required_at_parse
    if option.is_bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option.repeated:
        kwargs.update(action=RepeatAction, type=option.convert)
    else:
        kwargs["type"] = option.convert
    if option.choices is not None:
        kwargs["choices"] = option.choices
    parser.add_argument(option.flag, **kwargs)


class RepeatAction(argparse.Action):
    """A flag given again adds to a tuple (argparse's "append" needs a list default;
    a settings field holds a tuple)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, (*(before or ()), values))


def _add_tls(parser: argparse.ArgumentParser, what: str, env: Mapping[str, str], given_only: bool) -> None:
    group = parser.add_argument_group("mutual TLS", f"all three or none (plaintext); {what}")
    for flag, help_text in TLS_FLAGS.items():
        name = flag.removeprefix("--").replace("-", "_").upper()
        default = argparse.SUPPRESS if given_only else env.get(f"{ENV_PREFIX}{name}")
        group.add_argument(flag, default=default, help=f"{help_text}, PEM ({ENV_PREFIX}{name})")


def from_args(cls: type[S], args: argparse.Namespace, environ: Mapping[str, str] | None = None, **values: Any) -> S:
    """``cls`` from flags parsed by a parser :func:`add_arguments` made, plus ``values``.

    A field without a flag takes its variable (read now from ``environ``, by default
    ``os.environ``) or its default. A required field still missing, or a partial or
    unreadable TLS trio, exits naming the flag.
    """
    env = os.environ if environ is None else environ
    for option in options(cls).values():
        if option.name in values:
            continue
        if option.flag is not None:
            if not hasattr(args, option.dest):
                continue  # not a flag of this parser: the class's default
            value = getattr(args, option.dest)
        else:
            value = option.from_env(env)
            if value is dataclasses.MISSING:
                continue
        if value is None and not option.has_default:
            what = f"{option.flag} (or {ENV_PREFIX}{option.env})" if option.env else option.flag
            raise SystemExit(f"{what} is required")
        values[option.name] = value
    tls = _tls_field(cls)
    if tls is not None and tls.name not in values:
        values[tls.name] = tls_from_args(args)
    return cls(**values)


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    """The --tls-* flags as a config (all three or none), or exit with the reason."""
    try:
        return TlsConfig.from_paths(
            getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
        )
    except TlsConfigError as exc:
        raise SystemExit(str(exc)) from None


def forwarded_flags(cls: type[Any], args: argparse.Namespace, names: Collection[str]) -> list[str]:
    """The flags among ``names`` that were given (added with ``given_only=True``), as argv for a child."""
    argv: list[str] = []
    for option in options(cls).values():
        if option.name not in names or option.flag is None or not hasattr(args, option.dest):
            continue
        value = getattr(args, option.dest)
        if option.is_bool:
            argv.append(option.flag if value else "--no-" + option.flag.removeprefix("--"))
        elif option.repeated:
            for item in value:
                argv += [option.flag, str(item)]
        else:
            argv += [option.flag, str(value)]
    return argv

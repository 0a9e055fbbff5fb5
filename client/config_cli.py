"""The `config`, `service` and `doctor` subcommands (wired into the main CLI by ``add_parser``).

Kept light: the modules behind each command are imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_config(subparsers)
    _add_service(subparsers)
    _add_doctor(subparsers)


# ---- config ----------------------------------------------------------------------------------------------------


def _add_config(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "config",
        help="show, locate or create the config file",
        description="Settings: defaults < config file < SOTTOVOCE_* environment < command-line flags.",
    )
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the effective settings and where each came from")
    show.add_argument("--json", action="store_true", help="one JSON object: {key: {value, source}}")
    show.set_defaults(func=cmd_config_show)
    where = sub.add_parser("path", help="print the config file's path")
    where.set_defaults(func=cmd_config_path)
    init = sub.add_parser("init", help="write a commented config file listing every setting")
    init.add_argument("--force", action="store_true", help="replace an existing config file")
    init.add_argument("--print", action="store_true", help="print the template instead of writing it")
    init.set_defaults(func=cmd_config_init)


def _config_error(exc: Exception) -> int:
    print(f"sottovoce: config error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _shown(key: str, value: Any) -> Any:
    """A setting's value as `config show` prints it: secrets only say whether they are set."""
    from . import config

    if config.is_secret(key) and value is not None:
        return "<set>"
    return value


def _engines(settings: Any) -> dict[str, str]:
    """Per stage, which engine would run it and why (needs the daemon package; empty without it)."""
    try:
        from sottovoce.daemon import engines
    except ImportError:
        return {}
    return engines.describe(settings)


def cmd_config_show(args: argparse.Namespace) -> int:
    from . import config, paths

    path = paths.config_file()
    try:
        settings, sources = config.load(config_path=path)
    except config.ConfigError as exc:
        return _config_error(exc)
    values = {name: _shown(name, getattr(settings, name)) for name in config.FIELDS}
    unknown = config.unknown_env_vars()
    engines = _engines(settings)
    if args.json:
        out: dict[str, Any] = {
            "config_file": str(path),
            "config_file_exists": path.exists(),
            "settings": {k: {"value": v, "source": sources[k]} for k, v in values.items()},
            "engines": engines,
            "ignored_env": unknown,
        }
        print(json.dumps(out, ensure_ascii=False, indent=1))
        return EXIT_OK
    state = "" if path.exists() else "  (does not exist: `sottovoce config init` writes a commented one)"
    print(f"# config file: {path}{state}")
    width = max(len(k) for k in values)
    for key, value in values.items():
        source = sources[key]
        label = "file" if source == str(path) else source
        print(f"{key:<{width}} = {config.toml_value(value)}  # {label}")
    for stage, line in engines.items():
        print(f"# {'speech-to-text' if stage == 'stt' else 'chat model'}: {line}")
    for var in unknown:
        print(f"# ignored {var}: not a sottovoce setting", file=sys.stderr)
    return EXIT_OK


def cmd_config_path(args: argparse.Namespace) -> int:
    from . import paths

    print(paths.config_file())
    return EXIT_OK


def cmd_config_init(args: argparse.Namespace) -> int:
    from . import config

    if args.print:
        print(config.template(), end="")
        return EXIT_OK
    try:
        path = config.write_template(force=args.force)
    except config.ConfigError as exc:
        return _config_error(exc)
    except OSError as exc:
        print(f"sottovoce: cannot write the config file: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(f"wrote {path} (every setting commented out: uncomment what you want to change)")
    return EXIT_OK


# ---- service ---------------------------------------------------------------------------------------------------


def _add_service(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "service",
        help="run the daemon (and tray) at login: systemd user units or LaunchAgents",
        description="Install per-user services: systemd user units on Linux, LaunchAgents on macOS.",
    )
    sub = parser.add_subparsers(dest="service_command", required=True, metavar="ACTION")
    install = sub.add_parser("install", help="write the service files for this installation and start them")
    _add_only(install)
    install.add_argument("--no-start", action="store_true", help="write and enable, but do not start now")
    install.add_argument("--print", action="store_true", help="print the files instead of installing them")
    install.add_argument(
        "--manager",
        choices=("systemd", "launchd"),
        help="service manager (default: systemd on Linux, launchd on macOS); with --print, any system",
    )
    install.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the services (repeatable)",
    )
    install.set_defaults(func=cmd_service_install)
    uninstall = sub.add_parser("uninstall", help="stop the services and remove their files")
    _add_only(uninstall)
    uninstall.set_defaults(func=cmd_service_uninstall)
    status = sub.add_parser("status", help="show whether the services are installed and running")
    _add_only(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_service_status)


def _add_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        choices=("daemon", "tray"),
        help="just this service (install defaults to the daemon, plus the tray when the tray extra is installed)",
    )


def _roles(args: argparse.Namespace, default: Any) -> list[Any]:
    return [args.only] if args.only else list(default)


def cmd_service_install(args: argparse.Namespace) -> int:
    from . import config, service

    extra: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"sottovoce service install: --env wants KEY=VALUE, got {item!r}", file=sys.stderr)
            return EXIT_USAGE
        extra[key] = value
    try:
        inst = service.Installation.current(extra)
        roles = _roles(args, service.default_roles())
        manager = _manager(args.manager)
        if args.print:
            for f in manager.files(inst, roles):
                print(f"# ==> {f.path} <==")
                print(f.text)
            return EXIT_OK
        notes = service.install(manager, inst, roles, start=not args.no_start, check_config=_check_config)
    except config.ConfigError as exc:
        print(f"sottovoce: not installing: the config is invalid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except service.ServiceError as exc:
        print(f"sottovoce: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for note in notes:
        print(note)
    if args.only is None and "tray" not in roles:
        print("tray not installed: the tray extra is missing (pip install 'sottovoce[tray]', then install again)")
    for var in _shell_only_settings(inst):
        print(f"note: {var} is set in this shell but the services do not see it; put it in the config file")
    return EXIT_OK


def _manager(kind: str | None) -> Any:
    from . import service

    if kind == "systemd":
        return service.SystemdUser()
    if kind == "launchd":
        return service.Launchd()
    return service.manager_for()


def _check_config() -> None:
    from . import config

    config.load()


def _shell_only_settings(inst: Any) -> list[str]:
    import os

    from . import config

    passed = {k for k, _ in inst.environment}
    names = {config.env_name(f) for f in config.FIELDS}
    return sorted(v for v in os.environ if v in names and v not in passed)


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    from . import service

    try:
        manager = service.manager_for()
        notes = service.uninstall(manager, _roles(args, service.ROLES))
    except (service.ServiceError, OSError) as exc:
        print(f"sottovoce: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for note in notes:
        print(note)
    return EXIT_OK


def cmd_service_status(args: argparse.Namespace) -> int:
    """Exit 0 when every installed service runs, 1 when one is installed but not running, 3 when none is installed."""
    from . import service

    try:
        manager = service.manager_for()
        try:
            inst: service.Installation | None = service.Installation.current()
        except service.ServiceError:
            inst = None
        states = service.status(manager, inst, _roles(args, service.ROLES))
    except service.ServiceError as exc:
        print(f"sottovoce: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        rows = [{**s.__dict__, "path": str(s.path), "logs": manager.logs(s.role)} for s in states]
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        for s in states:
            if not s.installed:
                print(f"{s.role:6} not installed ({s.path})")
                continue
            pid = f", pid {s.pid}" if s.pid else ""
            stale = "" if s.current else "; the file differs from what `service install` would write now"
            print(f"{s.role:6} {s.name}: {s.detail}{pid} ({s.path}{stale})")
            print(f"{'':6} logs: {manager.logs(s.role)}")
    installed = [s for s in states if s.installed]
    if not installed:
        return 3
    return EXIT_OK if all(s.running for s in installed) else EXIT_FAIL


# ---- doctor ----------------------------------------------------------------------------------------------------


def _add_doctor(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check the installation and say how to fix what is wrong",
        description="One line per check with the fix; exit status 1 when something is wrong.",
    )
    parser.add_argument("--endpoint", help="daemon endpoint (default: from the config)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the daemon (default 3)")
    parser.add_argument("--no-mic", action="store_true", help="do not record from the microphone")
    parser.add_argument(
        "--load", action="store_true", help="when no daemon runs, load the models here to prove they load (slow)"
    )
    parser.add_argument("--json", action="store_true", help="a JSON list of {ok, line, fix}")
    parser.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    import logging

    from . import doctor

    logging.basicConfig(level=logging.ERROR)
    opts = doctor.Options(
        endpoint=args.endpoint, timeout=args.timeout, microphone=not args.no_mic, load_models=args.load
    )
    checks = doctor.run_checks(opts)
    print(doctor.report(checks, as_json=args.json))
    return doctor.exit_code(checks)

"""The `modelyard` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
from typing import Any

from rich.console import Console
from rich.table import Table

from modelyard.auth.commands import add_key_commands
from modelyard.auth.exposure import auth_mode, exposure_problem, open_route_warnings
from modelyard.checking.checks import config_warnings, load_checked_config
from modelyard.checking.preflight import detected_gpus, preflight
from modelyard.client import call_gateway
from modelyard.config import ConfigError, GatewayConfig
from modelyard.config.units import format_bytes
from modelyard.engines import engine_kind
from modelyard.observability import console as views
from modelyard.observability.log_format import configure_logging
from modelyard.redaction import redact, register_secrets

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    result: int = args.run(args)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelyard", description=__doc__)
    verbs = parser.add_subparsers(title="commands")

    serve = verbs.add_parser("serve", help="run the gateway")
    serve.add_argument("-c", "--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="listen address (overrides the config's listen)")
    serve.add_argument("--port", type=int, help="listen port (overrides the config's listen)")
    serve.add_argument("--log-level", default=os.environ.get("MODELYARD_LOG_LEVEL", "INFO"))
    serve.set_defaults(run=_serve)

    demo = verbs.add_parser(
        "demo", help="set up and serve the built-in demo (real vLLM on CPU, no GPU needed)"
    )
    demo.add_argument("--port", type=int, help="listen port (default: the demo config's 8000)")
    demo.add_argument(
        "--setup-only",
        action="store_true",
        help="build the engine venv and the demo models, then exit",
    )
    demo.add_argument("--log-level", default=os.environ.get("MODELYARD_LOG_LEVEL", "INFO"))
    demo.set_defaults(run=_demo)

    check = verbs.add_parser("check", help="validate a config and print what would run")
    check.add_argument("-c", "--config", required=True)
    check.add_argument(
        "--skip-machine-checks",
        action="store_true",
        help="the config is for another machine (an image, a server): do not check this "
        "machine's GPUs, engine programs and folders",
    )
    check.set_defaults(run=_check)

    pull = verbs.add_parser(
        "pull", help="download a model's weights ahead of its first start (Hugging Face hub)"
    )
    pull.add_argument("model", help="a model of the config (with -c), or a hub name org/model")
    pull.add_argument("-c", "--config", help="YAML config: its model's weights and engine env")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.set_defaults(run=_pull)

    for verb, helptext in (("status", "models and their states, from a running gateway"),):
        command = verbs.add_parser(verb, help=helptext)
        _client_args(command)
        command.set_defaults(run=_status)

    events = verbs.add_parser("events", help="recent events from a running gateway")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("-n", "--recent", type=int, default=50, help="past events to show")
    events.add_argument("--model", help="only this model's events")
    _client_args(events)
    events.set_defaults(run=_events)

    for verb in ("load", "unload", "sleep"):
        command = verbs.add_parser(verb, help=f"{verb} a model on a running gateway")
        command.add_argument("model")
        if verb == "sleep":
            command.add_argument("--level", type=int, choices=(1, 2))
        _client_args(command)
        command.set_defaults(run=_admin_action, verb=verb)

    logs = verbs.add_parser(
        "logs", help="a model's engine output (a replica's: coder#2), from a running gateway"
    )
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=200, help="past lines to show")
    _client_args(logs)
    logs.set_defaults(run=_logs)

    reload = verbs.add_parser(
        "reload", help="re-read a running gateway's config file and apply the changes"
    )
    _client_args(reload)
    reload.set_defaults(run=_reload)
    add_key_commands(verbs)  # keys create, hash, list, change, revoke
    return parser


def _client_args(command: argparse.ArgumentParser) -> None:
    command.add_argument("--url", default=os.environ.get("MODELYARD_URL", DEFAULT_URL))
    command.add_argument(
        "--key",
        default=os.environ.get("MODELYARD_API_KEY"),
        help="API key (default: $MODELYARD_API_KEY)",
    )
    command.add_argument("--json", action="store_true", help="print raw JSON")


def _load(path: str, machine_checks: bool = True) -> GatewayConfig | None:
    """The config, or None after printing every problem (the schema's, then this machine's:
    GPUs too small, programs missing), so one run shows them all."""
    try:
        config = load_checked_config(path)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return None
    if not machine_checks:
        for warning in config_warnings(path, config):
            print(f"modelyard: warning: {warning}", file=sys.stderr)
        return config
    found = preflight(config, detected_gpus(config))
    for warning in [*config_warnings(path, config), *(f"{path}: {w}" for w in found.warnings)]:
        print(f"modelyard: warning: {warning}", file=sys.stderr)
    for problem in found.errors:
        print(f"{path}: {problem}", file=sys.stderr)
    return None if found.errors else config


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    file_listen = config.listen
    host = args.host or config.host
    port = args.port if args.port is not None else config.port
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    config = config.model_copy(update={"listen": listen})
    problem = exposure_problem(config)  # no keys: loopback only, unless explicitly allowed
    if problem is not None:
        print(f"modelyard: {problem}", file=sys.stderr)
        return 1
    print(f"modelyard: {auth_mode(config)}", flush=True)
    for line in open_route_warnings(config):
        print(f"modelyard: {line}", flush=True)
    configure_logging(args.log_level, config.log_format)
    from modelyard.server import StateDirError, serve
    from modelyard.tls import TlsError

    try:
        serve(config, config_path=args.config, log_level=args.log_level, file_listen=file_listen)
    except (StateDirError, TlsError) as error:
        print(f"modelyard: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:  # what only the state shows (a key name a runtime key has)
        for problem in error.problems:
            print(f"modelyard: {problem}", file=sys.stderr)
        return 1
    except Exception as error:
        # A Ray cluster that cannot be reached (runtime: ray) is a setup problem: say so
        # plainly instead of with a traceback.
        if type(error).__name__ != "RayUnavailable":
            raise
        print(f"modelyard: {error}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    """`make demo`: everything the demo needs, once, then the gateway on examples/demo.yaml."""
    from modelyard.demo import demo_config_path, prepare_demo

    setup = prepare_demo()
    if args.setup_only:
        return 0
    os.environ.update(setup.environ)  # the demo config reads MODELYARD_HOME and friends
    path = str(demo_config_path())
    config = _load(path)
    if config is None:
        return 1
    port = args.port if args.port is not None else config.port
    url = f"http://{config.host}:{port}"
    print(
        f"\nmodelyard demo: {', '.join(config.models)} at {url}\n"
        "Models start on their first request (about 30-60 s on a CPU), then answer at once:\n"
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        """    -d '{"model": "chat", "messages": [{"role": "user", "content": "Say hello"}], """
        """"max_tokens": 32}'\n"""
        f"  curl -s {url}/v1/models\n"
        f"Dashboard: {url}/ui    Status: modelyard status --url {url}\n",
        flush=True,
    )
    return _serve(argparse.Namespace(config=path, host=None, port=port, log_level=args.log_level))


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config, machine_checks=not args.skip_machine_checks)
    if config is None:
        return 1
    register_secrets(config.secret_values())
    console = Console()
    table = Table(title=f"{args.config}: {len(config.models)} models, listen {config.listen}")
    for column in ("model", "engine", "route", "aliases", "idle", "command"):
        table.add_column(column, overflow="fold")
    for name, model in config.models.items():
        spec = engine_kind(model.engine).launch_spec(name, model, config, 0, None)
        # The plan may be pasted into an issue or a CI log: `${env:}` secrets stay masked.
        argv = redact(" ".join(spec.argv).replace(" --port 0", " --port {port}"))
        if spec.remote_url is not None:
            argv = f"(runs elsewhere) {redact(spec.remote_url)}"
        idle = (
            model.idle_timeout if model.idle_timeout is not None else config.defaults.idle_timeout
        )
        table.add_row(
            name,
            model.engine,
            model.route or "-",
            ", ".join(model.aliases) or "-",
            f"{idle:.0f}s",
            argv,
        )
    console.print(table)
    if config.gpus:
        for gpu in config.gpus:
            console.print(f"gpu {gpu.index}: {format_bytes(gpu.memory)} (declared)")
    problem = exposure_problem(config)  # what `serve` would refuse, `check` refuses too
    if problem is None and config.tls is not None:
        from modelyard.tls import TlsError, certificate_context

        try:
            certificate_context(config.tls.cert, config.tls.key)
        except TlsError as error:
            problem = str(error)
    if problem is not None:
        print(f"modelyard: {problem}", file=sys.stderr)
        return 1
    from modelyard.server import state_dir_problem

    problem = state_dir_problem(config.state_dir, create=False)
    if problem is not None:
        print(f"modelyard: {args.config}: {problem}", file=sys.stderr)
        return 1
    console.print(auth_mode(config), markup=False)
    for line in open_route_warnings(config):
        console.print(line, markup=False)
    console.print("config OK")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from modelyard.weights.pull import PullError, pull, pull_request_for, pulled_bytes

    config = None
    if args.config is not None:
        config = _load(args.config)
        if config is None:
            return 1
    try:
        request = pull_request_for(args.model, config, args.revision, os.environ)
        print(f"modelyard: pulling {request.repo_id}", flush=True)
        path = pull(request)
    except PullError as error:
        print(f"modelyard: {error}", file=sys.stderr)
        return 1
    print(f"modelyard: {request.repo_id}: {format_bytes(pulled_bytes(path))} in {path}")
    return 0


def _request(args: argparse.Namespace, method: str, path: str) -> Any:
    return call_gateway(args.url, args.key, method, path)


def _status(args: argparse.Namespace) -> int:
    status = _request(args, "GET", "/gateway/status")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    views.print_status(Console(), status, f"modelyard at {args.url}")
    return 0


def _events(args: argparse.Namespace) -> int:
    if not args.follow:
        result = _request(args, "GET", views.events_path(args.recent, args.model, follow=False))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            views.print_events(Console(), result["events"], f"events at {args.url}")
        return 0
    console = Console(highlight=False, soft_wrap=True)

    def show(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        else:
            console.print(views.event_line(event))

    def reconnecting(reason: str) -> None:
        console.print(f"[dim]event stream lost ({reason}); reconnecting[/dim]")

    try:
        views.follow_events(
            views.Endpoint(args.url, args.key), args.recent, args.model, show, reconnecting
        )
    except KeyboardInterrupt:
        return 0
    except urllib.error.HTTPError as error:
        raise SystemExit(f"modelyard: GET /admin/events: {error.code}: {error.reason}") from None
    return 0


def _admin_action(args: argparse.Namespace) -> int:
    path = f"/admin/models/{args.model}/{args.verb}"
    if args.verb == "sleep" and args.level:
        path += f"?level={args.level}"
    if args.verb == "load" and not args.json:
        from modelyard.observability.load_view import follow_load

        def model_status() -> dict[str, Any] | None:
            status = call_gateway(args.url, args.key, "GET", "/gateway/status")
            found = [m for m in status.get("models", []) if m.get("name") == args.model]
            return found[0] if found else None

        result = follow_load(
            args.model, lambda: _request(args, "POST", path), model_status, Console()
        )
    else:
        result = _request(args, "POST", path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['name']}: {result['state']}")
    return 0


def _logs(args: argparse.Namespace) -> int:
    model, _, replica = args.model.partition("#")  # `coder#2`: the model's second engine
    path = f"/admin/logs/{urllib.parse.quote(model, safe='')}?lines={max(args.lines, 0)}"
    if replica:
        path += f"&replica={urllib.parse.quote(replica, safe='')}"
    if not args.follow:
        result = _request(args, "GET", path)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            engines = result.get("replicas") or []
            if len(engines) > 1:  # which engine this is, on stderr: stdout is the log alone
                print(
                    f"modelyard: the log of engine {result.get('replica')!r}; the model's "
                    f"engines: {', '.join(engines)} (modelyard logs '{model}#2' for a replica's)",
                    file=sys.stderr,
                )
            for line in result["lines"]:
                print(line)
        return 0
    try:
        for line in views.follow_sse_lines(views.Endpoint(args.url, args.key), path + "&follow=1"):
            print(line, flush=True)
    except KeyboardInterrupt:
        return 0
    except urllib.error.HTTPError as error:
        raise SystemExit(f"modelyard: GET {path}: {error.code}: {error.reason}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"modelyard: cannot reach {args.url}: {error.reason}") from None
    return 0


def _reload(args: argparse.Namespace) -> int:
    result = _request(args, "POST", "/admin/reload")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    changes = result.get("changes") or []
    print(
        f"reloaded {result['file']}: " + (f"{len(changes)} change(s)" if changes else "no changes")
    )
    for change in changes:
        # A setting's change names no model; a model's change names it.
        subject = f"{change['model']}: " if change.get("model") else ""
        print(f"  {change['what']}: {subject}{change['detail']}")
    for note in result.get("not_applied") or []:
        print(f"  not applied (needs a restart): {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

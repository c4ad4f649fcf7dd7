"""The one ServerApp and ClientApp of fedkd, used by simulation and deployment alike.

- ``client_app``: dispatches each message to the client logic the server names in its config
  (``fedkd.clients.CLIENTS``), with the registered client mods around it.
- ``server_app``: for ``flwr run`` (deployment or Flower's managed simulation). It reads the
  experiment from the run config: ``config`` (path of an experiment TOML), ``set`` (overrides, e.g.
  ``set="run.rounds=3 data.num_clients=2"``), and ``out`` (the run directory; default ``run.out_dir/<name>-<time>``).
  In-process simulations call :func:`fedkd.server.run_server` directly instead.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd import keys
from fedkd.deploy.worker import forward_mod

# Imports are lazy: in a deployment every message starts a fresh ClientApp process that imports this module,
# so it pulls in only Flower here and the client side (fedkd.clients, its mods, the config sections) on the
# first message it runs itself. With a warm worker (fedkd.deploy.worker, deploy.warm_worker) the ClientApp
# process forwards the message to the node's worker, which runs this same client_app, and never imports torch.
# The ServerApp's imports happen in its main.


def _client_mods(msg: Message, context: Context, call_next) -> Message:
    """fedkd.clients.MODS (privacy mods, fault injection), imported when the first message arrives.

    Applied in Flower's order: MODS[0] is outermost (sees the message first and the reply last)."""
    from fedkd.clients import MODS

    handler = call_next
    for mod in reversed(MODS):
        handler = (lambda m, nxt: lambda message, ctx: m(message, ctx, nxt))(mod, handler)
    return handler(msg, context)


# forward_mod is outermost: in a deployment with FEDKD_CACHE_DIR it hands the message to the node's warm
# worker, which calls this client_app again (where forward_mod passes it on); elsewhere it is a no-op.
client_app = ClientApp(mods=[forward_mod, _client_mods])


def _logic_env(msg: Message, context: Context):
    from fedkd.clients import CLIENTS, client_env

    name = str(msg.content[keys.CONFIG].get(keys.CLIENT_LOGIC, "weights"))
    return CLIENTS.get(name)(), client_env(msg, context)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    logic, env = _logic_env(msg, context)
    evaluated = None
    if msg.content[keys.CONFIG].get(keys.EVALUATE_RECEIVED, False):
        # rounds of one exchange (fedkd.deploy.one_exchange): evaluate the received model before training it
        evaluated = logic.evaluate(msg, context, env).content[keys.METRICS]
    out = logic.train(msg, context, env)
    if evaluated is not None and out.has_content():
        out.content[keys.RECEIVED_EVALUATION] = ConfigRecord(dict(evaluated))
    return out


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    logic, env = _logic_env(msg, context)
    return logic.evaluate(msg, context, env)


def config_from_run_config(run_config: dict, app_dir: str | Path | None = None):
    """The experiment named by a Flower run config (``config`` path + dotted overrides)."""
    from fedkd.config import flat_overrides, load_config

    path = run_config.get("config")
    if path:
        p = Path(str(path))
        if not p.is_absolute():
            candidates = [Path.cwd() / p] + ([Path(app_dir) / p] if app_dir else []) + [Path(__file__).resolve().parents[1] / p]
            p = next((c for c in candidates if c.is_file()), p)
        path = p
    overrides = [f"{k}={_as_text(v)}" for k, v in flat_overrides(dict(run_config)).items()]
    # `set`: space-separated section.key=value overrides in one string (flwr run accepts only the keys
    # declared in pyproject.toml's [tool.flwr.app.config], so dotted keys cannot be passed one by one).
    overrides += shlex.split(str(run_config.get("set", "") or ""))
    return load_config(path, overrides)


def _as_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v.startswith("[") else f'"{v}"'
    return repr(v)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedkd.config import ConfigError
    from fedkd.deploy.grid import PollingGrid
    from fedkd.deploy.one_exchange import OneExchange, allowed
    from fedkd.results import RunRecorder, write_summary
    from fedkd.server import new_run_dir, run_server, summarize
    from fedkd.strategies import build_strategy

    t0 = time.perf_counter()
    # Under `flwr run` the ServerApp talks to a SuperLink over HTTP ("deployment"; a SuperLink started with
    # --simulation looks the same from here); Flower's in-process run_simulation hands it an InMemoryGrid.
    runtime = "flower-simulation" if "InMemory" in type(grid).__name__ else "deployment"
    try:
        cfg = config_from_run_config(dict(context.run_config))
    except ConfigError as e:
        raise SystemExit(f"fedkd: {e}") from None
    out = context.run_config.get("out")
    recorder = RunRecorder(new_run_dir(cfg, str(out) if out else None))
    print(f"fedkd: run directory {recorder.out_dir}", flush=True)
    exchanges = 2 if cfg.strategy.fraction_evaluate > 0 else 1
    try:
        spec = None
        if runtime == "deployment":
            grid = PollingGrid(grid, cfg.deploy.pull_interval)  # Flower's deployed Grid pulls replies every 3 s
        if cfg.deploy.one_exchange != "off":
            from fedkd.data import load_federation
            from fedkd.server import seed_everything

            seed_everything(cfg.run.seed)  # as run_server does before it builds the strategy
            spec = build_strategy(cfg, load_federation(cfg.data, cfg.run.seed))
            ok, why = allowed(cfg, spec.client)
            if ok:
                record = lambda rnd, who, metrics: recorder.add_many(rnd, who, "test", metrics)  # noqa: E731
                spec.strategy, exchanges = OneExchange(spec.strategy, cfg.run.rounds, record), 1
            elif cfg.deploy.one_exchange == "on":
                raise SystemExit(f"fedkd: deploy.one_exchange: 'on' is not valid here: {why}")
        print(f"fedkd: {exchanges} exchange(s) per round" + (" (and one evaluate exchange after the last)" if exchanges == 1 and cfg.strategy.fraction_evaluate > 0 else ""), flush=True)
        run_server(grid, cfg, recorder, spec=spec, progress=False, echo=lambda s: print(s, flush=True))
    except BaseException as e:
        failed = summarize(cfg, recorder, t0, status="failed", error=f"{type(e).__name__}: {e}")
        write_summary(recorder.out_dir, {**failed, "backend": runtime})
        raise
    summary = summarize(cfg, recorder, t0)
    summary = write_summary(recorder.out_dir, {**summary, "backend": runtime, "exchanges_per_round": exchanges})
    print(f"fedkd: accuracy {summary['accuracy']:.4f}, summary in {recorder.out_dir / 'summary.json'}", flush=True)

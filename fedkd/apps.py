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

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedkd import keys
from fedkd.config import ConfigError, flat_overrides, load_config, load_plugins

load_plugins()

from fedkd.clients import CLIENTS, MODS, client_env  # noqa: E402

client_app = ClientApp(mods=MODS)


def _logic(msg: Message):
    name = str(msg.content[keys.CONFIG].get(keys.CLIENT_LOGIC, "weights"))
    return CLIENTS.get(name)()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _logic(msg).train(msg, context, client_env(msg, context))


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _logic(msg).evaluate(msg, context, client_env(msg, context))


def config_from_run_config(run_config: dict, app_dir: str | Path | None = None):
    """The experiment named by a Flower run config (``config`` path + dotted overrides)."""
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
    from fedkd.results import RunRecorder, write_summary
    from fedkd.server import new_run_dir, run_server, summarize

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
    try:
        run_server(grid, cfg, recorder, progress=False, echo=lambda s: print(s, flush=True))
    except BaseException as e:
        failed = summarize(cfg, recorder, t0, status="failed", error=f"{type(e).__name__}: {e}")
        write_summary(recorder.out_dir, {**failed, "backend": runtime})
        raise
    summary = summarize(cfg, recorder, t0)
    summary = write_summary(recorder.out_dir, {**summary, "backend": runtime})
    print(f"fedkd: accuracy {summary['accuracy']:.4f}, summary in {recorder.out_dir / 'summary.json'}", flush=True)

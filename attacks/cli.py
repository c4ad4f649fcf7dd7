"""``fedkd attack RUN_DIR|CONFIG [--set attack.name=ig ...] [--out DIR]``.

- RUN_DIR: a run recorded with ``attack.rounds``/``attack.clients``; attacks its ``observations/``.
  Only ``attack.name``, ``attack.steps``, ``attack.restarts``, ``attack.tv``, ``attack.order`` and ``run.device`` may change (the rest was fixed
  when the clients trained).
- CONFIG: an experiment TOML; runs the federation (recording round 1, client 0 unless
  ``attack.rounds``/``attack.clients`` say otherwise), then attacks it.

Writes ``attack.json`` (attack, defence, psnr, ssim, label_acc, baseline_psnr/ssim (mean image),
class_baseline_psnr/ssim (class-conditional mean image of the guessed labels), wall_s, per-image
values) and ``attack.png`` (originals above reconstructions) into the run directory (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkd.cli import command
from fedkd.config import ConfigError, load_config

ATTACK_TIME_KEYS = ("attack.name", "attack.steps", "attack.restarts", "attack.tv", "attack.order", "run.device")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory with observations/, or an experiment TOML to run and attack")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set attack.name=ig (repeatable)")
    p.add_argument("--out", help="where attack.json/attack.png go (CONFIG: the run directory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_recording(config_path: Path, overrides: list[str]) -> list[str]:
    """Record round 1 / client 0 unless the TOML file or the overrides say which."""
    import tomllib

    given = {o.split("=", 1)[0].strip() for o in overrides}
    if config_path.is_file():
        try:
            section = tomllib.loads(config_path.read_text()).get("attack", {})
        except tomllib.TOMLDecodeError:
            section = {}  # load_config reports it
        given |= {f"attack.{k}" for k in section}
    defaults = [d for d in ("attack.rounds=[1]", "attack.clients=[0]") if d.split("=")[0] not in given]
    return defaults + list(overrides)


@command("attack", "gradient inversion by the server against a recorded or fresh run", _args)
def cmd_attack(args: argparse.Namespace) -> int:
    import sys

    from .observation import ObservationError

    try:
        return _attack(args)
    except ObservationError as e:  # the observation cannot feed this attack: one line, exit 2
        print(f"fedkd: error: {e}", file=sys.stderr)
        return 2


def _attack(args: argparse.Namespace) -> int:
    from .runner import attack_run_dir

    target = Path(args.target)
    if target.is_dir():
        if not (target / "config.toml").is_file():
            raise ConfigError("attack", f"{target} is not a run directory (no config.toml)")
        for item in args.overrides:
            key = item.split("=", 1)[0].strip()
            if key not in ATTACK_TIME_KEYS:
                raise ConfigError(key, f"cannot change a recorded run; attacking {target} allows only {', '.join(ATTACK_TIME_KEYS)}")
        cfg = load_config(target / "config.toml", args.overrides)
        result = attack_run_dir(target, cfg, args.out)
    else:
        from fedkd.experiment import run_experiment

        cfg = load_config(target, default_recording(target, args.overrides))
        summary = run_experiment(cfg, args.out, progress=not args.no_progress)
        result = attack_run_dir(summary["run_dir"], cfg)
    print(
        f"\n{result['attack']} vs {result['defence']}: psnr {result['psnr']:.2f} dB (baselines: mean image {result['baseline_psnr']:.2f}, "
        f"class mean {result['class_baseline_psnr']:.2f}), strength {result['strength']}, "
        f"ssim {result['ssim']:.3f}, label acc {result['label_acc']:.2f}, {result['wall_s']:.1f} s\n"
        f"wrote {Path(result['run_dir']) / 'attack.json' if not args.out or not target.is_dir() else Path(args.out) / 'attack.json'} and {result['png']}"
    )
    return 0

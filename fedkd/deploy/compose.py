"""docker-compose files generated from :mod:`fedkd.deploy.topology` (``fedkd deploy compose``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from fedkd.deploy.topology import COMPOSE_FILES, COMPOSE_NODES, compose_document, compose_header


def compose_text(variant: str, nodes: int | None = None) -> str:
    doc = compose_document(variant, nodes or COMPOSE_NODES)
    return compose_header(variant) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def write_compose_files(directory: Path, nodes: int | None = None, check: bool = False) -> list[Path]:
    """Write (or with ``check``, compare) the three compose files; returns those that changed / differ."""
    changed = []
    for variant, name in COMPOSE_FILES.items():
        path = Path(directory) / name
        text = compose_text(variant, nodes)
        if path.is_file() and path.read_text() == text:
            continue
        changed.append(path)
        if not check:
            path.write_text(text)
    return changed

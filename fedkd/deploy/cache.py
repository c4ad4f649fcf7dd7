"""The federation a node trains on, from a cache written once per node.

In a deployment every message starts a fresh ClientApp process, which would load the dataset and partition it
again (and import scikit-learn to do so). With ``FEDKD_CACHE_DIR`` set in a SuperNode's environment
(``fedkd deploy local`` gives each SuperNode its own folder; docker-compose sets it per container), the first
ClientApp of a run builds the federation with :func:`fedkd.data.load_federation` and pickles it there
(atomically: a temporary file, then ``os.replace``); later ones load the pickle. Without the variable this is
``load_federation`` itself.

The file name is a hash of the data config, the seed, fedkd's version and the size and modification time of
the code that builds federations (``fedkd/data/*.py``), so a changed experiment or partitioner never reads a
stale file. Delete the folder to rebuild. The folder must be the node's own: a pickle is code.

:func:`preload` hands a process a federation built elsewhere (the fast path's driver sends the one it loaded to
its actors, so they import no scikit-learn and partition nothing); ``node_federation`` returns it first.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from pathlib import Path

CACHE_ENV = "FEDKD_CACHE_DIR"
_PRELOADED: dict = {}  # (data config, seed) -> Federation handed to this process by preload()


def preload(data_cfg, seed: int, fed) -> None:
    """Make ``node_federation(data_cfg, seed)`` return ``fed`` in this process (the last 4 are kept)."""
    _PRELOADED.pop((data_cfg, seed), None)
    _PRELOADED[(data_cfg, seed)] = fed
    while len(_PRELOADED) > 4:
        _PRELOADED.pop(next(iter(_PRELOADED)))


def _fingerprint() -> str:
    import fedkd
    import fedkd.data

    parts = [fedkd.__version__]
    for path in sorted(Path(fedkd.data.__file__).parent.glob("*.py")):
        st = path.stat()
        parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


def cache_path(directory: str | Path, data_cfg, seed: int) -> Path:
    key = hashlib.sha256(f"{data_cfg!r}|{seed}|{_fingerprint()}".encode()).hexdigest()[:24]
    return Path(directory) / f"federation-{key}.pkl"


def node_federation(data_cfg, seed: int):
    """``load_federation(data_cfg, seed)``, through the node's cache when ``FEDKD_CACHE_DIR`` is set (a
    federation :func:`preload`-ed into this process comes first)."""
    fed = _PRELOADED.get((data_cfg, seed))
    if fed is not None:
        return fed
    from fedkd.data import load_federation

    directory = os.environ.get(CACHE_ENV)
    if not directory:
        return load_federation(data_cfg, seed)
    path = cache_path(directory, data_cfg, seed)
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
        pass  # not there yet (or unreadable): build it and write it
    fed = load_federation(data_cfg, seed)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the node's own: a pickle is code
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(fed, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fed

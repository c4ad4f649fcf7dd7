"""Client-side logic, by name. The ClientApp dispatches each message to the logic the server names.

The server puts ``keys.CLIENT_LOGIC`` (default ``"weights"``) and the resolved experiment
(``keys.EXPERIMENT``) into every message's ConfigRecord, so a SuperNode needs nothing but its
partition id. Add a client: write ``clients/<paper>.py`` with a :class:`ClientLogic` subclass,
register it with ``@CLIENTS.register("<name>")`` and import the module below.

Client mods (privacy mechanisms paired with server wrappers) go into ``MODS``; each one must pass
messages through untouched unless the experiment config turns it on.
"""

from __future__ import annotations

from fedkd.registry import Registry

from .base import ClientEnv, ClientLogic, client_env, node_record, reply

CLIENTS: Registry[type[ClientLogic]] = Registry("client")
MODS: list = []

from . import weights  # noqa: E402,F401  (registers "weights")
from . import local, fd, fedmd  # noqa: E402,F401  (registers "local", "fd", "fedmd")
from . import feddf, fedd2s  # noqa: E402,F401  (registers "feddf", "fedd2s")
from . import fedlgd  # noqa: E402,F401  (registers "fedlgd")
from . import hyperfl, pfedhn  # noqa: E402,F401  (registers "hyperfl", "pfedhn", "pfedhn-pc")

from . import rqm  # noqa: E402,F401  (appends the RQM client mod to MODS)

from . import attacked  # noqa: E402,F401  (the attacks' threat settings, off unless attack.rounds/clients are set)
from . import faults  # noqa: E402,F401  (fault injection for robustness tests, off unless [faults] says so)

__all__ = ["CLIENTS", "MODS", "ClientEnv", "ClientLogic", "client_env", "node_record", "reply"]

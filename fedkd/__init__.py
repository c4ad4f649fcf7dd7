"""fedkd: privacy research in federated learning on Flower.

Public packages: ``fedkd.data``, ``fedkd.models``, ``fedkd.training``, ``fedkd.strategies``,
``fedkd.clients``, ``fedkd.attacks``, ``fedkd.privacy``; the apps are ``fedkd.apps:server_app`` and
``fedkd.apps:client_app``.
"""

__version__ = "0.1.0"

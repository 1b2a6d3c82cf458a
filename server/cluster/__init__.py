"""Serving past one machine: the same HTTP API in front of engine pools on a Ray cluster.

``v4serve serve --ray ADDRESS`` runs the ingress (``ingress.py``: the application of
``server.api``, unchanged) in its own process, and one replica (``replica.py``: an actor
holding an ``EnginePool``) per node or GPU set. The ingress's pool holds a
``RemoteEngine`` per model, a handle that forwards to the replica the ``Router`` chose for
that model, so every route, error and stream works as on one machine.

Nothing here is imported unless ``--ray`` is given: a single-machine server never imports
Ray. See docs/cluster.md.
"""

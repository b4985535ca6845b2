"""gradserve on a Ray cluster (``gradserve serve --ray-address``).

Nothing here is imported by the default single-process server: ``app.py``
imports ``cluster.frontend`` (and with it ``ray``) only when
``--ray-address`` is given. This package's ``__init__`` and ``errors``
import no Ray, so the error contract can name the cluster's refusals.

- ``frontend``: ``ClusterRegistry``, the registry a stateless front-end
  serves from: every call for a model goes to the model's owner actor.
- ``owner``: ``ModelOwner``, the named detached actor that owns one model:
  a ``ModelRegistry`` over the model's own SQLite store and mutation log,
  so a restarted owner recovers at its last acknowledged step.
- ``replicas``: ``DataParallelGroup`` and its ``Replica`` actors: a
  model with ``replicas=N`` trains on N actors in one placement group.
- ``runtime``: each actor's environment (thread budget from its CPU
  reservation, the shared Numba cache, the source roots).
"""

"""The query kinds, each a handler the engine dispatches to (``QueryEngine.register``).

A kind is a :class:`~govshare.node.queries.engine.KindHandler`: it parses its plan (from
``govshare.model``), builds the access request the policy decides (its columns, ε, release),
runs its protocol part through ``QueryEngine.execute`` and takes its peers' messages
(``Peer.Deliver``, one generic stream for every kind: ``phase`` names the step, the chunks carry
points and/or opaque items). Everything else — signature, replay, rate limit, policy, approval,
budget reservations, admission control, cancellation, abort notices, stop, recovery, receipts —
is the engine's and the same for every kind.

- ``psi``: PSI cardinality and membership (ECDH-PSI).
- ``aggregate``: joint aggregates under homomorphic encryption (intersection and horizontal).

A new kind touches: its plan in ``model/``, its handler here (registered in ``node/node.py``),
its analyst-side program in ``client/``, its CLI command, and its tests. No ``.proto`` changes
while it reuses a result shape (``Query.Run``'s chunks or ``Aggregate.Run``'s ciphertexts).
"""

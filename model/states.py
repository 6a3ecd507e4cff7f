"""The states of a joint query at a node, and of the ε reservation it holds.

Query states: ``pending_approval`` → ``approved`` | ``denied`` | ``expired`` | ``cancelled``;
``approved`` → ``running`` → ``done`` | ``failed``, or ``expired`` when the signed request's
validity ended before it ran, or ``cancelled`` when the analyst withdrew it first; a policy
refusal is stored as ``refused`` with its rule. Reservations: ``reserved`` → ``spent`` |
``returned``. The node stores them (``govshare.node.stores.query_store``); the analyst's client
reads them from ``Query.Status``.
"""

from __future__ import annotations

PENDING = "pending_approval"
APPROVED = "approved"
DENIED = "denied"
REFUSED = "refused"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
RESERVED = "reserved"
SPENT = "spent"
RETURNED = "returned"
EXPIRED = "expired"

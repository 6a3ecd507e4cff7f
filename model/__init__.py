"""The vocabulary both sides share: plans, filter conditions, the ε codec, query states, roster and
member types, audit events, digests, reconciliation, risk rules. Imports neither govshare.node,
govshare.client nor govshare.rpc, and no transport or storage (tests/test_layers.py)."""

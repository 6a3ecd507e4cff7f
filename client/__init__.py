"""The analyst's and the auditor's programs: ask a query, verify receipts; pull, verify, reconcile
and check logs. Never imports govshare.node (tests/test_layers.py)."""

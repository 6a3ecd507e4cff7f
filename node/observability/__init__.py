"""What a serving node tells its operator, outside the audit log: query events, structured logs,
Prometheus metrics and a plain-HTTP health check.

Nothing here writes to the audit log or needs a federation certificate: the audit log is the
evidence auditors verify, these are the operator's gauges. ``events`` is the seam the query
engine emits into; ``logs`` renders events as JSON lines; ``metrics`` counts them in a registry
of the node's own; ``rpc_metrics`` counts RPCs by method and status code; ``endpoint`` serves
``/metrics`` and ``/healthz`` over HTTP on a local port.
"""

"""Policy: the decision, grants, cross-border records, approvals, risk alerts and suspension."""

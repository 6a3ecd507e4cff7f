"""Policy: the decision, grants, cross-border records, approvals (with the separation of duties),
risk alerts and suspension, operator acts (who may act, signed), access applications, and the
operator's controls (approvers required, freezes)."""

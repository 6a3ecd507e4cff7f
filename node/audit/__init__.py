"""The node's audit log, the sink others write through, checkpoints, witnessing, self-check."""

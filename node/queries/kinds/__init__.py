"""The query kinds the engine runs beyond its own PSI kinds: the joint aggregates."""

"""The query engine: admission, decision, running and release of joint queries (kinds/)."""

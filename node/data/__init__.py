"""The node's data: catalogue and dataset tables, join-key normalisers, resident ids, masking."""

"""SQLite stores that belong to no other room: the connection helper and the query store."""

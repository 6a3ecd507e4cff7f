"""The node's gRPC face: the server, the thin servicers and the authentication interceptor."""

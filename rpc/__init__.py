"""gRPC plumbing both sides use: the node client, TLS credentials, the error <-> status mapping and
proto <-> model conversions. Never imports govshare.node or govshare.client."""

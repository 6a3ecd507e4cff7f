"""Mutual-TLS credentials for servers and channels, from a member's identity bundle.

Every channel is mutual TLS. A client dials a node by its roster address and checks that the
server certificate names the node it meant to reach (``ssl_target_name_override`` set to the
member name, which is the certificate's DNS SAN).
"""

from __future__ import annotations

import grpc

from govshare.model.identity import Identity, Member
from govshare.protocols.errors import MalformedInput

# Protocol messages can be large (a chunk of 32-byte points or Paillier ciphertexts).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Server credentials that require and verify a client certificate from the federation CA."""
    return grpc.ssl_server_credentials(
        [(identity.tls_key_pem, identity.tls_cert_pem)],
        root_certificates=identity.ca_cert_pem,
        require_client_auth=True,
    )


def secure_channel(identity: Identity, member: Member) -> grpc.Channel:
    """A mutual-TLS channel from ``identity`` to the node ``member``."""
    if not member.address:
        raise MalformedInput(f"roster has no address for {member.name}", field="address")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_cert_pem,
        private_key=identity.tls_key_pem,
        certificate_chain=identity.tls_cert_pem,
    )
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", member.name)]
    return grpc.secure_channel(member.address, credentials, options=options)

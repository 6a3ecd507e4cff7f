"""cffi builder of ``govshare.protocols.x25519_batch_native`` (the batch loops of
``x25519_batch.c`` over OpenSSL 3's libcrypto), run by setup.py at install time
(``cffi_modules``).

The extension is optional: where OpenSSL's headers or library are missing (Debian's
``libssl-dev``; ``make`` installs it as root) the install still succeeds without it, and
:mod:`govshare.protocols.x25519_batch` warns and falls back to the point-by-point path.
"""

from __future__ import annotations

import os

from cffi import FFI

MODULE = "govshare.protocols.x25519_batch_native"
HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "x25519_batch.c")

# The functions x25519_batch.c defines, as cffi sees them (also their prototypes in the
# generated wrapper, which compiles beside x25519_batch.c).
DECLARATIONS = """
int govshare_x25519_batch_init(void);
void govshare_x25519_canonical_u(unsigned char *u);
int govshare_x25519_mask_batch(const unsigned char *scalar, const unsigned char *points,
                               size_t count, unsigned char *out, size_t *bad_index);
int govshare_x25519_hash_and_mask_batch(const unsigned char *scalar, const unsigned char *prefix,
                                        size_t prefix_len, const unsigned char *keys,
                                        const uint64_t *ends, size_t count, unsigned char *out,
                                        size_t *bad_index);
"""

ffibuilder = FFI()
ffibuilder.cdef(DECLARATIONS)
ffibuilder.set_source(
    MODULE,
    "#include <stddef.h>\n#include <stdint.h>\n" + DECLARATIONS,
    # A path relative to the project root keeps setuptools' sdist and editable builds happy.
    sources=[os.path.relpath(SOURCE)],
    libraries=["crypto"],
    # setuptools turns a failed build of an optional extension into a warning.
    optional=True,
)

/* Batch loops over libsodium's X25519 and SHA-256 for govshare.protocols.ecdh_psi.
 *
 * Glue only: every curve operation is libsodium's crypto_scalarmult_curve25519 (RFC 7748
 * X25519, scalar clamped by libsodium) and every hash is libsodium's crypto_hash_sha256. This
 * file only walks packed arrays, so that a chunk of points crosses from Python to C once
 * instead of once per point. It computes exactly the functions of ecdh_psi's point-by-point
 * path (see x25519_batch.py); the tests compare the two byte for byte.
 *
 * Built with cffi at install time (protocols/x25519_batch_build.py, via setup.py).
 */
#include <sodium.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define GOVSHARE_POINT_SIZE 32

/* Status codes shared with x25519_batch.py. */
#define GOVSHARE_OK 0
#define GOVSHARE_NOT_CANONICAL 1
#define GOVSHARE_SMALL_ORDER 2
#define GOVSHARE_INIT_FAILED 3

int govshare_x25519_batch_init(void) {
    /* Picks libsodium's fastest X25519 for this CPU; safe to call more than once. */
    return sodium_init() < 0 ? GOVSHARE_INIT_FAILED : GOVSHARE_OK;
}

/* 1 when the 32 little-endian bytes are >= p = 2^255 - 19 once bit 255 is ignored, i.e. the
 * top byte is 0x7f, bytes 30..1 are 0xff and byte 0 is at least 0xed. A comparison with the
 * constant p, not arithmetic in the field. */
static int at_least_p(const unsigned char *u) {
    int i;
    if ((u[31] & 0x7f) != 0x7f || u[0] < 0xed) {
        return 0;
    }
    for (i = 1; i < 31; i++) {
        if (u[i] != 0xff) {
            return 0;
        }
    }
    return 1;
}

/* ecdh_psi.canonical_u in place: clear bit 255, then, for u in [p, 2^255), u - p (which lies
 * in [0, 18], so only byte 0 is left non-zero). */
void govshare_x25519_canonical_u(unsigned char *u) {
    u[31] &= 0x7f;
    if (at_least_p(u)) {
        unsigned char low = (unsigned char)(u[0] - 0xed);
        memset(u, 0, GOVSHARE_POINT_SIZE);
        u[0] = low;
    }
}

/* X25519(scalar, point) for each of `count` packed points, written packed to `out`.
 *
 * First every point is checked canonical (bit 255 clear, u < p), as ecdh_psi.decode_points
 * does; then each is masked. On a refusal *bad_index is the first refused point and nothing in
 * `out` is meaningful. libsodium returns -1 for an all-zero output (a point of small order),
 * and for the small-order inputs it refuses up front, which give an all-zero output anyway. */
int govshare_x25519_mask_batch(const unsigned char *scalar, const unsigned char *points,
                               size_t count, unsigned char *out, size_t *bad_index) {
    size_t i;
    for (i = 0; i < count; i++) {
        const unsigned char *point = points + i * GOVSHARE_POINT_SIZE;
        if ((point[31] & 0x80) || at_least_p(point)) {
            *bad_index = i;
            return GOVSHARE_NOT_CANONICAL;
        }
    }
    for (i = 0; i < count; i++) {
        if (crypto_scalarmult_curve25519(out + i * GOVSHARE_POINT_SIZE, scalar,
                                         points + i * GOVSHARE_POINT_SIZE) != 0) {
            *bad_index = i;
            return GOVSHARE_SMALL_ORDER;
        }
    }
    return GOVSHARE_OK;
}

/* X25519(scalar, canonical_u(SHA-256(prefix || key_i))) for each key, written packed to `out`.
 *
 * The keys are concatenated in `keys`; key i spans keys[ends[i-1]:ends[i]] (ends[-1] = 0). The
 * prefix (domain tag, query id length and query id) is absorbed once and its state copied for
 * every key. */
int govshare_x25519_hash_and_mask_batch(const unsigned char *scalar, const unsigned char *prefix,
                                        size_t prefix_len, const unsigned char *keys,
                                        const uint64_t *ends, size_t count, unsigned char *out,
                                        size_t *bad_index) {
    crypto_hash_sha256_state prefixed, state;
    unsigned char point[crypto_hash_sha256_BYTES];
    uint64_t start = 0;
    size_t i;
    crypto_hash_sha256_init(&prefixed);
    crypto_hash_sha256_update(&prefixed, prefix, prefix_len);
    for (i = 0; i < count; i++) {
        memcpy(&state, &prefixed, sizeof state);
        crypto_hash_sha256_update(&state, keys + start, (unsigned long long)(ends[i] - start));
        crypto_hash_sha256_final(&state, point);
        start = ends[i];
        govshare_x25519_canonical_u(point);
        if (crypto_scalarmult_curve25519(out + i * GOVSHARE_POINT_SIZE, scalar, point) != 0) {
            *bad_index = i;
            sodium_memzero(&state, sizeof state);
            return GOVSHARE_SMALL_ORDER;
        }
    }
    sodium_memzero(&state, sizeof state);
    return GOVSHARE_OK;
}

/* Batch loops over OpenSSL's X25519 and SHA-256 for govshare.protocols.ecdh_psi.
 *
 * Glue only: every curve operation is OpenSSL's X25519 key derivation (EVP_PKEY_derive on
 * EVP_PKEY_X25519 keys: RFC 7748 X25519, the scalar clamped by OpenSSL) and every hash is
 * OpenSSL's SHA-256 -- the library that pyca/cryptography, ecdh_psi's point-by-point path,
 * wraps too, so the project has one implementation of each. This file only walks packed
 * arrays, so that a chunk of points crosses from Python to C once instead of once per point,
 * and keeps one peer key object for the whole chunk (EVP_PKEY_set1_encoded_public_key), where
 * building a key per point costs about a tenth of the ladder. It computes exactly the functions
 * of ecdh_psi's point-by-point path (see x25519_batch.py); the tests compare the two byte for
 * byte.
 *
 * Built with cffi at install time (protocols/x25519_batch_build.py, via setup.py).
 */
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define GOVSHARE_POINT_SIZE 32

/* Status codes shared with x25519_batch.py. */
#define GOVSHARE_OK 0
#define GOVSHARE_NOT_CANONICAL 1
#define GOVSHARE_SMALL_ORDER 2
#define GOVSHARE_LIBRARY_FAILED 3 /* OpenSSL itself failed: not a refused point */

/* The base point, u = 9: the peer key's value until the first point replaces it. */
static const unsigned char BASE_POINT[GOVSHARE_POINT_SIZE] = {9};

int govshare_x25519_batch_init(void) {
    /* X25519 and SHA-256 are in the default provider of every OpenSSL 3. */
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_X25519, NULL);
    EVP_MD *sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    int ok = ctx != NULL && sha256 != NULL;
    EVP_PKEY_CTX_free(ctx);
    EVP_MD_free(sha256);
    ERR_clear_error();
    return ok ? GOVSHARE_OK : GOVSHARE_LIBRARY_FAILED;
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

/* One chunk's masking: the scalar's key, one peer key whose value each point replaces, and a
 * derivation context. */
typedef struct {
    EVP_PKEY *own;
    EVP_PKEY *peer;
    EVP_PKEY_CTX *ctx;
} masker;

static void masker_close(masker *m) {
    EVP_PKEY_CTX_free(m->ctx); /* frees the scalar's copies; OpenSSL clears private keys */
    EVP_PKEY_free(m->peer);
    EVP_PKEY_free(m->own);
    ERR_clear_error();
}

static int masker_open(masker *m, const unsigned char *scalar) {
    m->own = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, scalar, GOVSHARE_POINT_SIZE);
    m->peer = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, BASE_POINT,
                                          GOVSHARE_POINT_SIZE);
    m->ctx = m->own == NULL ? NULL : EVP_PKEY_CTX_new(m->own, NULL);
    if (m->peer == NULL || m->ctx == NULL || EVP_PKEY_derive_init(m->ctx) <= 0) {
        masker_close(m);
        return GOVSHARE_LIBRARY_FAILED;
    }
    return GOVSHARE_OK;
}

/* X25519(scalar, point) into out. OpenSSL's derivation fails on an all-zero output (a point of
 * small order); setting the peer fails only when OpenSSL itself does. */
static int masker_mask(masker *m, const unsigned char *point, unsigned char *out) {
    size_t length = GOVSHARE_POINT_SIZE;
    if (EVP_PKEY_set1_encoded_public_key(m->peer, point, GOVSHARE_POINT_SIZE) <= 0 ||
        EVP_PKEY_derive_set_peer_ex(m->ctx, m->peer, 0) <= 0) {
        return GOVSHARE_LIBRARY_FAILED;
    }
    if (EVP_PKEY_derive(m->ctx, out, &length) <= 0 || length != GOVSHARE_POINT_SIZE) {
        return GOVSHARE_SMALL_ORDER;
    }
    return GOVSHARE_OK;
}

/* X25519(scalar, point) for each of `count` packed points, written packed to `out`.
 *
 * First every point is checked canonical (bit 255 clear, u < p), as ecdh_psi.decode_points
 * does; then each is masked. On a refusal *bad_index is the first refused point and nothing in
 * `out` is meaningful. */
int govshare_x25519_mask_batch(const unsigned char *scalar, const unsigned char *points,
                               size_t count, unsigned char *out, size_t *bad_index) {
    masker m;
    size_t i;
    int status = GOVSHARE_OK;
    for (i = 0; i < count; i++) {
        const unsigned char *point = points + i * GOVSHARE_POINT_SIZE;
        if ((point[31] & 0x80) || at_least_p(point)) {
            *bad_index = i;
            return GOVSHARE_NOT_CANONICAL;
        }
    }
    if (count == 0) {
        return GOVSHARE_OK;
    }
    if (masker_open(&m, scalar) != GOVSHARE_OK) {
        return GOVSHARE_LIBRARY_FAILED;
    }
    for (i = 0; i < count && status == GOVSHARE_OK; i++) {
        status = masker_mask(&m, points + i * GOVSHARE_POINT_SIZE, out + i * GOVSHARE_POINT_SIZE);
        *bad_index = i;
    }
    masker_close(&m);
    return status;
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
    unsigned char point[GOVSHARE_POINT_SIZE];
    uint64_t start = 0;
    size_t i;
    int status = GOVSHARE_OK;
    masker m;
    EVP_MD *sha256;
    EVP_MD_CTX *prefixed, *state;
    if (count == 0) {
        return GOVSHARE_OK;
    }
    if (masker_open(&m, scalar) != GOVSHARE_OK) {
        return GOVSHARE_LIBRARY_FAILED;
    }
    sha256 = EVP_MD_fetch(NULL, "SHA256", NULL);
    prefixed = EVP_MD_CTX_new();
    state = EVP_MD_CTX_new();
    if (sha256 == NULL || prefixed == NULL || state == NULL ||
        EVP_DigestInit_ex(prefixed, sha256, NULL) <= 0 ||
        EVP_DigestUpdate(prefixed, prefix, prefix_len) <= 0) {
        status = GOVSHARE_LIBRARY_FAILED;
    }
    for (i = 0; i < count && status == GOVSHARE_OK; i++) {
        *bad_index = i;
        if (EVP_MD_CTX_copy_ex(state, prefixed) <= 0 ||
            EVP_DigestUpdate(state, keys + start, (size_t)(ends[i] - start)) <= 0 ||
            EVP_DigestFinal_ex(state, point, NULL) <= 0) {
            status = GOVSHARE_LIBRARY_FAILED;
            break;
        }
        start = ends[i];
        govshare_x25519_canonical_u(point);
        status = masker_mask(&m, point, out + i * GOVSHARE_POINT_SIZE);
    }
    OPENSSL_cleanse(point, sizeof point);
    EVP_MD_CTX_free(state); /* the digest contexts are cleared as they are freed */
    EVP_MD_CTX_free(prefixed);
    EVP_MD_free(sha256);
    masker_close(&m);
    return status;
}

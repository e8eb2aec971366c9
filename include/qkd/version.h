/* libqkd version. meson reads these three macros for the library's
 * version and soversion, so they are the single source of truth.
 * Same major version means ABI-compatible. */
#ifndef QKD_VERSION_H
#define QKD_VERSION_H

#define QKD_VERSION_MAJOR 0
#define QKD_VERSION_MINOR 1
#define QKD_VERSION_PATCH 0

/* One number that orders versions: 0.1.0 -> 100. */
#define QKD_VERSION_NUMBER \
    (QKD_VERSION_MAJOR * 10000 + QKD_VERSION_MINOR * 100 + QKD_VERSION_PATCH)

/* Compile-time check: #if QKD_VERSION_AT_LEAST(0, 1, 0) */
#define QKD_VERSION_AT_LEAST(major, minor, patch) \
    (QKD_VERSION_NUMBER >= ((major) * 10000 + (minor) * 100 + (patch)))

#endif

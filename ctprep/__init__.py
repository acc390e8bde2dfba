"""ctprep: raw chest CT -> one verified, chunked zarr v3 store of windowed, CLAHE-enhanced slices.

Stage 1 of ctprep + cttrain. This package never imports torch or cttrain.
"""

__version__ = "0.1.0"

# Bump when the cached pixels for the same config and source, or the store's format, would change;
# it is part of the store fingerprint, so an old store is refused instead of silently mixed with
# new rows. 2: every chunk carries a crc32c checksum (version-1 stores still read, without them).
CACHE_VERSION = 2

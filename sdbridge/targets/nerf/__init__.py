"""The NeRF target: hash-grid radiance field, random cameras, volume renderer, regularizers, mesh export."""

"""The on-disk format: the manifest and the per-block safetensors chunk files (read and write)."""

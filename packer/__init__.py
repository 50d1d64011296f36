"""The packer: resolves what programs need and writes the archive (shared/spec/format.md)."""

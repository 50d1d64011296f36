"""rpack: pack a Linux program and everything it needs into one root filesystem tar."""

__version__ = "0.1.0"

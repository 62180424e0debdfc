"""This host and the machines it starts: accelerator and topology decisions, QEMU command lines, guest roots."""

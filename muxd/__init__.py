"""muxd: a TCP/UDP echo daemon (RFC 862) on a hand-written I/O multiplexing loop."""

__version__ = "0.1.0"

"""The running daemon: its wiring, supervision, the socket API, systemd, the state directory,
notifications and metrics.
"""

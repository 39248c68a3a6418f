"""The supervisor: starts every role as a fresh interpreter, restarts what dies,
gives up loudly on a role that cannot boot, drains on SIGTERM."""

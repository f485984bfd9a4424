"""Image building for the local Modal server."""

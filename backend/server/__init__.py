"""The HTTP server that speaks Label Studio's ML backend protocol."""

"""Ray Serve deployment classes: thin adapters from Serve to the plain objects in ``serve_app``."""

"""The ingress's FastAPI app, built by ``create_app`` from its collaborators."""

"""Inference engines behind one small protocol (``serve_app.engines.base.InferenceEngine``)."""

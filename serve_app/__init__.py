"""IIR, the Intelligent Inference Router: the library the Ray Serve deployments are built from."""

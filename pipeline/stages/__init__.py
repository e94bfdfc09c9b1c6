"""The Ray layer: thin wrappers that run the core stages on a Ray cluster."""

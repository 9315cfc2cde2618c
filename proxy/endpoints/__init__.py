"""Sources of truth (Kubernetes watch, manifests) and the watch cache that feeds the model."""

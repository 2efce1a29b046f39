"""Head side: starting the head, the control plane API, the registry, the Ray adapter."""

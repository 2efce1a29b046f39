"""Ray Serve applications (model deployments) and their Serve config YAML files."""

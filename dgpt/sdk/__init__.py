"""The Python SDK: dgpt.Client and the versioned request/response models."""

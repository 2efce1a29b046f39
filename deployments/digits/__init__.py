"""The digits classifier: a small torch MLP on scikit-learn's 8x8 digits, and its Serve app."""

"""mimsparse: sparse masked image modeling on swappable sparse backends."""
__version__ = "0.1.0"

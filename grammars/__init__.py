"""The .sel grammar, shipped as package data."""

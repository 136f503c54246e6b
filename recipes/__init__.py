"""The prelude and method recipes, shipped as package data."""

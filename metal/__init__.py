"""The Metal kernel sources of mlx_sbd, shipped as package data (read with importlib.resources)."""

"""Fewer expert calls without removing experts: top-k allocation, and which layers to drop."""

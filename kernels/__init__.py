"""Triton kernels, each with the plain-torch reference it is checked against."""

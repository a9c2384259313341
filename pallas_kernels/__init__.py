"""Pallas kernels for jaxlm's hot loops (one folder per kernel family; see the design notes).

Kernels arrive with the linear-family and PaTH kernel work; ``jaxlm.ops.<op>(..., impl="pallas")`` will
dispatch here.
"""

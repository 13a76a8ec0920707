"""Shared test setup.

Worker threads that spin while idle (libgomp's default) cost tens of ms per parallel region when
the cores are oversubscribed (CI runners, a shared dev box); the suite checks correctness, not
speed, so idle OpenMP threads sleep. Set before torch is imported; an explicit setting wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

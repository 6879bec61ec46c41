"""Fused CPU selective-scan kernel (placeholder until the C++ kernel lands: reports unavailable)."""

from __future__ import annotations


def available() -> bool:
    return False


def selective_scan_cpp(u, delta, A, B, C):  # pragma: no cover - replaced by the kernel
    raise RuntimeError("the fused CPU scan kernel is not built")

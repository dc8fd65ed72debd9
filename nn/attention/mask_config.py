"""MHAMaskVariant: which keys a query may attend to (on absolute positions qp, kp)."""
from __future__ import annotations

import enum


class MHAMaskVariant(enum.Enum):
    """CAUSAL: kp <= qp; NULL: all; SLIDING_WINDOW_CAUSAL: kp <= qp and qp - kp < W;
    SLIDING_WINDOW_NONCAUSAL: qp - kp < W; CHUNKED_CAUSAL: kp <= qp and kp // W == qp // W."""

    CAUSAL_MASK = "causal"
    NULL_MASK = "null"
    SLIDING_WINDOW_CAUSAL_MASK = "sliding_window_causal"
    SLIDING_WINDOW_NONCAUSAL_MASK = "sliding_window_noncausal"
    CHUNKED_CAUSAL_MASK = "chunked_causal"

    @property
    def needs_window(self) -> bool:
        return self in (MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK,
                        MHAMaskVariant.SLIDING_WINDOW_NONCAUSAL_MASK,
                        MHAMaskVariant.CHUNKED_CAUSAL_MASK)


def as_mask_variant(v) -> MHAMaskVariant:
    """A member from a member, its name ("CAUSAL_MASK") or its value ("causal")."""
    if isinstance(v, MHAMaskVariant):
        return v
    if isinstance(v, str):
        for m in MHAMaskVariant:
            if v in (m.name, m.value) or v.lower() == m.value:
                return m
    raise ValueError(f"unknown mask variant {v!r}; expected an MHAMaskVariant or one of "
                     f"{[m.value for m in MHAMaskVariant]}")

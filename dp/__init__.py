"""Differential-privacy add-on for gnnumba (content arrives with its own issue)."""

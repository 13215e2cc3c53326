"""Adapters that let other test-time-scaling libraries use ``ttsearch serve`` (optional extras)."""

"""Deciding across models: the scheduler, its pure decision function, one supervisor per model."""

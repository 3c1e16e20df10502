"""Reading a run back: export as Hugging Face directories (`export`), status, tables and plots
(`report`), and what staged fitness did (`staging`)."""

__all__ = ["export", "report", "staging"]

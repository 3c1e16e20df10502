"""Running a search: the Candidate record (`candidate`), the run loop (`loop`) over mode
strategies (`modes`), journalled and staged scoring (`scoring`, `stages`), the weights'
lifecycle (`weights`), Ray actors (`workers`), the run directory (`store`, `lock`), start and
resume (`session`), fault injection for tests (`faults`) and latency timing (`latency`)."""

__all__ = ["candidate", "faults", "latency", "lock", "loop", "modes", "scoring", "session", "stages", "store", "weights", "workers"]

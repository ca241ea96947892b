"""Planning a run before it starts: per-GPU memory of each phase (:mod:`.memory`)."""

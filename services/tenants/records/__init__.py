"""RecordService: the servicer (checks, cache, answers), its store (SQL), checks and mapping."""

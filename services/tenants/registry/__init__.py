"""TenantService: the servicer (checks, cascades, answers), its store (SQL), checks and mapping."""

"""Generated Strata stubs; see protos/."""

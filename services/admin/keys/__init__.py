"""API keys: issued, listed, revoked (CreateApiKey, ListApiKeys, RevokeApiKey) and checked for the
gateway (AuthenticateApiKey, internal)."""

-- API keys: the secret is never stored, only HMAC-SHA256(pepper, secret).
CREATE SCHEMA admin;
GRANT USAGE ON SCHEMA admin TO strata_app;

CREATE TABLE admin.api_keys (
    key_id text PRIMARY KEY,
    tenant text NOT NULL,
    name text NOT NULL,
    scopes text[] NOT NULL,
    secret_hash bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX api_keys_by_tenant ON admin.api_keys (tenant, key_id);

GRANT SELECT, INSERT ON admin.api_keys TO strata_app;
GRANT UPDATE (revoked_at) ON admin.api_keys TO strata_app;

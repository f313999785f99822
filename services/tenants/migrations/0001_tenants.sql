-- The tenant registry and tenant-scoped JSON records.
--
-- "Tenant id" across Strata is the tenant's slug: API keys, KV rows and
-- records carry it. Records are protected by row-level security: the
-- service sets strata.tenant_id inside each transaction
-- (set_config(..., true)) and Postgres shows and accepts only that tenant's
-- rows, whatever the query. The service role owns nothing and has no
-- BYPASSRLS, so FORCE applies to it.

CREATE SCHEMA tenants;
GRANT USAGE ON SCHEMA tenants TO strata_app;

CREATE TABLE tenants.tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug text NOT NULL UNIQUE,
    display_name text NOT NULL DEFAULT '',
    status smallint NOT NULL DEFAULT 1 CHECK (status IN (1, 2)),  -- TenantStatus: 1 active, 2 suspended
    plan text NOT NULL DEFAULT '',
    metadata jsonb NOT NULL DEFAULT '{}',
    version bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants.tenants TO strata_app;

CREATE TABLE tenants.records (
    tenant text NOT NULL,
    collection text NOT NULL,
    id text NOT NULL,
    data jsonb NOT NULL,
    revision bigint NOT NULL DEFAULT 1,
    request_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, collection, id)
);
CREATE UNIQUE INDEX records_by_request_id ON tenants.records (tenant, collection, request_id)
    WHERE request_id IS NOT NULL;
CREATE INDEX records_by_create_time ON tenants.records (tenant, collection, created_at, id);
CREATE INDEX records_by_update_time ON tenants.records (tenant, collection, updated_at, id);

ALTER TABLE tenants.records ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants.records FORCE ROW LEVEL SECURITY;
CREATE POLICY records_of_the_current_tenant ON tenants.records
    USING (tenant = current_setting('strata.tenant_id', true))
    WITH CHECK (tenant = current_setting('strata.tenant_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants.records TO strata_app;

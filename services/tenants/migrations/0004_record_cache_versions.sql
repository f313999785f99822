-- A version for the record cache that only grows, across a record's whole
-- life: delete and re-create restart `revision` at 1, but never this. Each
-- write draws it after taking the row lock, so for one record it grows in
-- commit order, which is what the cache's "never replace a newer entry"
-- guard needs. A delete draws one too, for its tombstone.
CREATE SEQUENCE tenants.record_versions;
ALTER TABLE tenants.records ADD COLUMN cache_version bigint NOT NULL DEFAULT nextval('tenants.record_versions');
GRANT USAGE ON SEQUENCE tenants.record_versions TO strata_app;

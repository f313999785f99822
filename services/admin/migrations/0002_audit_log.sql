-- The audit log: one row per mutation made through AdminService or
-- TenantService, written in the mutation's own transaction (so a change
-- and its record commit or roll back together). Append-only for the
-- service role: it may insert and read, never update or delete.
CREATE TABLE admin.audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor_key_id text NOT NULL,
    actor_tenant text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    trace_id text NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_by_actor ON admin.audit_log (actor_key_id, id);
CREATE INDEX audit_log_by_action ON admin.audit_log (action, id);
CREATE INDEX audit_log_by_time ON admin.audit_log (at);

GRANT SELECT, INSERT ON admin.audit_log TO strata_app;

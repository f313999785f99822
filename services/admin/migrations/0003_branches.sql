-- The branch registry: databases of this cluster that the admin service made,
-- by copying the live database (CreateBranch, origin 'branch') or from a
-- backup (Restore, origin 'restore'). The admin service creates and drops
-- them as the owner role and drops only what is listed here.
--
-- A row is written (ready = false) before its database is created, so the
-- name is taken while the copy runs and a copy interrupted by a crash stays
-- listed, and removable with DeleteBranch. It turns ready, together with its
-- audit event, once the copy is complete.
CREATE TABLE admin.branches (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9_]{0,47}$'),
    database text NOT NULL UNIQUE CHECK (database = 'strata_branch_' || name),
    origin text NOT NULL CHECK (origin IN ('branch', 'restore')),
    ready boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, DELETE ON admin.branches TO strata_app;
GRANT UPDATE (ready) ON admin.branches TO strata_app;
